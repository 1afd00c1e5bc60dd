"""Generation caches and sampling: a cached forward equals the full forward's slice (fp32, 1e-5), greedy
decoding equals the argmax of repeated full forwards, the sampling knobs do what they say."""

import pytest
import torch

from jamba import JambaConfig, JambaForCausalLM
from jamba.generation import Sampling, generate, sample_next
from jamba.runtime import Runtime

VOCAB = 97


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-token ops: a second intra-op thread only waits (and spins badly on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hybrid(runtime: Runtime | None = None, **kw) -> JambaForCausalLM:
    """Mamba, Mamba+MoE, attention, Mamba, attention+MoE, Mamba+MoE; weights large enough that every layer
    moves the logits (a cache bug shows far above 1e-5)."""
    cfg = JambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        layer_pattern="MME*M*EME",
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        mamba_d_state=8,
        initializer_range=0.1,
        **kw,
    )
    return JambaForCausalLM(cfg, seed=0, runtime=runtime).eval()


@pytest.mark.parametrize("use_rope", [False, True])
def test_cached_logits_equal_the_full_forward(use_rope):
    # the 5-token prompt's scan spans two blocks
    model = hybrid(use_rope=use_rope, runtime=Runtime(scan_block_size=4))
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 14)
        # a prompt, single tokens, then several tokens after a non-empty cache (the masked path)
        parts = [model(ids[:, :5], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
        parts.append(model(ids[:, 9:], cache=cache).logits)
    assert full.abs().max() > 1.0  # the comparison below is not of near-zero numbers
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert all(c.length == 14 for c in cache)


def test_mixer_caches_hold_constant_state():
    model = hybrid()
    cache = model.new_cache(1, 64)
    mamba = [c for c, layer in zip(cache, model.model.layers, strict=True) if layer.kind == "mamba"][0]
    assert mamba.conv.shape == (1, model.config.mamba_d_inner, model.config.mamba_d_conv - 1)
    assert mamba.ssm.shape == (1, model.config.mamba_d_inner, 8) and mamba.ssm.dtype == torch.float32
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache full: it holds 64 tokens, 64 \\+ 1 asked"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_greedy_equals_argmax_of_full_forwards():
    model = hybrid(use_rope=True)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    want = prompt
    with torch.no_grad():
        for _ in range(12):
            want = torch.cat([want, model(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = Sampling(temperature=0)
    cached = generate(model, prompt, 12, greedy)
    uncached = generate(model, prompt, 12, greedy, use_cache=False)
    assert torch.equal(cached.tokens, want) and torch.equal(uncached.tokens, want)
    assert cached.new_tokens == 12 and len(set(want[0, 6:].tolist())) > 1  # not one token repeated


def test_stop_id_and_vocab_limit():
    model = hybrid()
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    first = generate(model, prompt, 1, Sampling(temperature=0)).tokens[0, -1].item()
    out = generate(model, prompt, 10, Sampling(temperature=0), stop_id=first)
    assert out.new_tokens == 1 and out.tokens[0, -1].item() == first
    limited = generate(
        model, prompt, 30, Sampling(temperature=2.0), torch.Generator().manual_seed(0), vocab_limit=10
    )
    assert limited.tokens[0, 4:].max() < 10


def test_sampling_knobs():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, Sampling(temperature=0)).unique().tolist() == [1]
    assert sample_next(logits, Sampling(top_k=1), g).unique().tolist() == [1]
    assert sorted(sample_next(logits, Sampling(top_k=2), g).unique().tolist()) == [1, 2]
    # p(1) = 0.46, p(2) = 0.42: top_p 0.5 needs both, 0.4 only the first
    assert sorted(sample_next(logits, Sampling(top_p=0.5), g).unique().tolist()) == [1, 2]
    assert sample_next(logits, Sampling(top_p=0.4), g).unique().tolist() == [1]
    assert len(sample_next(logits, Sampling(), g).unique()) == 5
    a = sample_next(logits, Sampling(), torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_next(logits, Sampling(), torch.Generator().manual_seed(7)))
