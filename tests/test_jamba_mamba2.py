"""Mamba-2 (pattern symbol 'S'): the chunked SSD against the plain recurrence, the generation cache against the
full forward, the model around it (counts, checkpointing, export refusal), and on a GPU mamba-ssm's kernel
against the chunked form."""

import pytest
import torch
import torch.nn.functional as F
from test_jamba_model import tiny

from jamba import JambaForCausalLM
from jamba.counting import count_params, flops_per_token
from jamba.hf_config import config_to_hf
from jamba.layers import CHECKPOINT_CHOICES, SSD_FLOPS_PER_STATE
from jamba.mamba2 import Mamba2Mixer
from jamba.mamba2_ssd import ssd_chunked, ssd_sequential
from parallel.apply import set_activation_checkpointing


def ssd_inputs(b=2, L=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, L, h, generator=gen))
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B, C = torch.randn(b, L, g, n, generator=gen), torch.randn(b, L, g, n, generator=gen)
    state = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("chunk", [4, 8, 64])  # several chunks with a padded last one; one chunk
def test_chunked_ssd_equals_sequential_recurrence(chunk):
    x, dt, A, B, C, state = ssd_inputs()
    y_seq, s_seq = ssd_sequential(x, dt, A, B, C, state)
    y, s = ssd_chunked(x, dt, A, B, C, chunk=chunk, state=state)
    torch.testing.assert_close(y, y_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_seq, rtol=1e-5, atol=1e-5)
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk=chunk)  # no state: zeros
    torch.testing.assert_close(
        y0, ssd_sequential(x, dt, A, B, C, torch.zeros_like(state))[0], rtol=1e-5, atol=1e-5
    )


def cfg2(**kw):
    base = dict(
        layer_pattern="S*ESMSE",
        num_hidden_layers=5,
        mamba2_head_dim=16,
        mamba2_n_groups=2,
        mamba2_d_state=8,
    )
    return tiny(**{**base, **kw})


def test_cached_forward_equals_full_forward(seed):
    cfg = cfg2()
    mixer = Mamba2Mixer(cfg)
    torch.nn.init.uniform_(mixer.A_log, 0, 2)
    torch.nn.init.uniform_(mixer.dt_bias, -3, 0)
    x = torch.randn(2, 80, cfg.hidden_size)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.new_cache(2, 80, x.device, x.dtype)
        parts, pos = [], 0
        for t in (70, 1, 4, 5):  # a chunked prefill (>= one chunk), then single and few-token steps
            parts.append(mixer(x[:, pos : pos + t], cache=cache))
            pos += t
    assert cache.seen == 80
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_model_trains_and_counts(seed):
    cfg = cfg2()
    m = JambaForCausalLM(cfg, seed=0)
    assert [layer.kind for layer in m.model.layers] == ["mamba2", "attention", "mamba2", "mamba", "mamba2"]
    assert isinstance(m.model.layers[0].mamba, Mamba2Mixer)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    out = m(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    grads = [p.grad for p in m.model.layers[0].mamba.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    c = count_params(cfg)
    assert c["total"] == sum(p.numel() for p in m.parameters())
    assert [r["total"] for r in c["per_layer"]] == [
        sum(p.numel() for p in x.parameters()) for x in m.model.layers
    ]
    f = flops_per_token(cfg, seq_len=10, training=False)
    mamba1 = 7 * cfg.mamba_d_inner * cfg.mamba_d_state
    assert f["selective_scan"] == 3 * SSD_FLOPS_PER_STATE * cfg.mamba_d_inner * cfg.mamba2_d_state + mamba1
    nd = m.no_weight_decay_names()
    assert {"model.layers.0.mamba.A_log", "model.layers.0.mamba.dt_bias", "model.layers.0.mamba.D"} <= nd
    assert "model.layers.0.mamba.in_proj.weight" not in nd


def test_init_is_mamba2_practice():
    cfg = cfg2()
    mix = JambaForCausalLM(cfg, seed=0).model.layers[0].mamba
    A = torch.exp(mix.A_log)
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 0
    dt = F.softplus(mix.dt_bias)
    assert (dt >= cfg.mamba_dt_min * 0.999).all() and (dt <= cfg.mamba_dt_max * 1.001).all()
    assert (mix.D == 1).all() and (mix.norm.weight == 1).all()


def test_checkpointing_unit_and_recompute(seed):
    assert "mamba2" in CHECKPOINT_CHOICES
    cfg = cfg2()
    m = JambaForCausalLM(cfg, seed=0).train()
    set_activation_checkpointing(m, "mamba2")
    assert [m.model._checkpointed(layer) for layer in m.model.layers] == [True, False, True, False, True]
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    loss = m(ids[:, :-1], labels=ids[:, 1:]).loss
    ref = JambaForCausalLM(cfg2(), seed=0).train()(ids[:, :-1], labels=ids[:, 1:]).loss
    torch.testing.assert_close(loss, ref)


def test_export_refuses_mamba2_naming_why():
    with pytest.raises(
        ValueError,
        match=r"layer 0 is a mamba2 layer .*not exportable, because transformers' Jamba has no Mamba-2 layer",
    ):
        config_to_hf(cfg2())


def test_head_dim_must_divide_inner_width():
    with pytest.raises(ValueError, match="mamba2_head_dim=48"):
        cfg2(mamba2_head_dim=48)
    cfg2(layer_pattern="M*EMMME", mamba2_head_dim=48)  # no Mamba-2 layer: not checked


@pytest.mark.gpu
def test_mamba_ssm_ssd_kernel_matches_chunked_reference_gpu():
    from jamba.mamba2_ssd import _ssd_kernel

    assert _ssd_kernel is not None, "mamba-ssm's SSD kernels are not importable on this GPU machine"
    x, dt, A, B, C, _ = (t.cuda() for t in ssd_inputs(b=2, L=300, h=4, p=16, g=2, n=16))
    D = torch.rand(4, device="cuda")
    dt_raw, dt_bias = torch.randn_like(dt), torch.randn(4, device="cuda")
    y = _ssd_kernel(x, dt_raw, A, B, C, 64, D=D, dt_bias=dt_bias, dt_softplus=True)
    ref, _ = ssd_chunked(x, F.softplus(dt_raw + dt_bias), A, B, C, chunk=32)
    ref = ref + x * D[:, None]
    assert (y - ref).abs().max() / ref.abs().max() < 1e-3


def test_planner_knows_mamba2_layers():
    from jamba import get_preset
    from parallel.memory import activation_bytes, param_counts

    base = get_preset("debug")
    cfg = base.replace(layer_pattern=base.pattern.replace("M", "S"))
    with torch.device("meta"):
        built = sum(p.numel() for p in JambaForCausalLM(cfg, init=False).parameters())
    assert built == count_params(cfg)["total"] == param_counts(cfg).total  # the model on meta == the registry
    none = activation_bytes(cfg, 1, 512, "none", 2)
    assert activation_bytes(cfg, 1, 512, "mamba", 2) == none  # no Mamba-1 layer left to recompute
    assert activation_bytes(cfg, 1, 512, "mamba2", 2) < none
    # a Mamba-2 layer keeps more per token than Mamba-1 here (its d_state 128 B and C through the conv)
    assert none > activation_bytes(base, 1, 512, "none", 2)
