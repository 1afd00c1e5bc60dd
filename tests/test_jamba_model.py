import pytest
import torch
from tiny import tiny_config

from jamba import JambaConfig, JambaForCausalLM, get_preset
from jamba.experts import experts_ref
from jamba.moe import SparseMoE
from jamba.runtime import Runtime
from parallel.apply import set_activation_checkpointing


def tiny(**kw) -> JambaConfig:
    return tiny_config(**{"vocab_size": 97, **kw})


def test_forward_backward_shapes_and_stats(seed):
    cfg = tiny()
    m = JambaForCausalLM(cfg, seed=0)
    x = torch.randint(0, 97, (2, 33))
    out = m(x[:, :-1], labels=x[:, 1:], return_logits=True)
    assert out.logits.shape == (2, 32, 97)
    assert [s["layer"] for s in out.router_stats] == [1, 3]
    for s in out.router_stats:
        assert int(s["tokens_per_expert"].sum()) == 2 * 32 * 2  # every token in top-k slots: dropless
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.001 * out.aux_loss.item(), rel=1e-6)
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


def test_chunked_loss_equals_full_logits_loss(seed):
    m = JambaForCausalLM(tiny(), seed=0, runtime=Runtime(loss_chunk_size=7))
    x = torch.randint(0, 97, (2, 33))
    labels = x[:, 1:].clone()
    labels[0, :5] = -100
    a = m(x[:, :-1], labels=labels)
    b = m(x[:, :-1], labels=labels, return_logits=True)
    assert a.logits is None
    torch.testing.assert_close(a.lm_loss, b.lm_loss)


@pytest.mark.parametrize("mode", ["full", "mamba", "attention", "moe"])
def test_activation_checkpointing_gives_same_grads(seed, mode):
    x = torch.randint(0, 97, (2, 17))
    grads = []
    for ckpt in ("none", mode):
        m = JambaForCausalLM(tiny(), seed=0)
        set_activation_checkpointing(m, ckpt)
        m(x[:, :-1], labels=x[:, 1:]).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_moe_matches_naive_per_token_loop(seed):
    cfg = tiny()
    moe = SparseMoE(cfg)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    x = torch.randn(3, 5, 32)
    y, stats = moe(x)
    flat = x.reshape(-1, 32)
    probs = torch.softmax(moe.router(flat), -1)
    w, idx = probs.topk(2, -1)  # not renormalised
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            e = int(idx[t, j])
            ref[t] += (
                w[t, j]
                * experts_ref(
                    flat[t : t + 1],
                    torch.tensor([1]),
                    moe.experts.gate_up_proj[e : e + 1],
                    moe.experts.down_proj[e : e + 1],
                )[0]
            )
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-6)
    f = torch.bincount(idx.reshape(-1), minlength=4).float() / 15
    torch.testing.assert_close(stats["aux_loss"], 4 * (f * probs.mean(0)).sum())


def test_rope_changes_output_and_nope_is_default(seed):
    x = torch.randint(0, 97, (1, 9))
    attn_only = dict(num_hidden_layers=1, attn_layer_period=1, attn_layer_offset=0, num_experts=1)
    a = JambaForCausalLM(tiny(**attn_only), seed=0)(x).logits
    b = JambaForCausalLM(tiny(**attn_only, use_rope=True), seed=0)(x).logits
    assert not torch.allclose(a, b)


def test_causality(seed):
    m = JambaForCausalLM(tiny(), seed=0).eval()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % 97
    torch.testing.assert_close(m(x).logits[:, :15], m(y).logits[:, :15])


def test_init_keeps_ssm_params_fp32_and_no_decay(seed):
    m = JambaForCausalLM(get_preset("debug"), seed=0)
    nd = m.no_weight_decay_names()
    assert "model.layers.0.mamba.A_log" in nd and "model.layers.0.mamba.D" in nd
    assert "model.layers.0.mamba.dt_proj.bias" in nd and "model.layers.0.input_layernorm.weight" in nd
    assert "model.layers.0.mamba.in_proj.weight" not in nd
    mix = m.model.layers[0].mamba
    dt = torch.nn.functional.softplus(mix.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    torch.testing.assert_close(mix.A_log[3], torch.log(torch.arange(1, 17).float()))


def test_same_seed_same_weights():
    a, b = JambaForCausalLM(tiny(), seed=3), JambaForCausalLM(tiny(), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=False):
        assert torch.equal(p, q), n


def test_out_of_range_ids_error():
    m = JambaForCausalLM(tiny(), seed=0)
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[1, 200]]))


def test_moe_gather_backward_equals_autograd_indexing(seed):
    from jamba.moe import _GatherSlots

    t, k = 11, 3
    x = torch.randn(t, 6, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(t * k)
    g = torch.randn(t * k, 6, dtype=torch.float64)
    (ref,) = torch.autograd.grad(x[order // k], x, g)
    rows = _GatherSlots.apply(x, order, k)
    torch.testing.assert_close(rows, x[order // k])
    (got,) = torch.autograd.grad(rows, x, g)
    torch.testing.assert_close(got, ref)


def test_router_losses_follow_their_formulas(seed):
    # z-loss: mean over tokens of logsumexp(router logits)^2, averaged over MoE layers; load balancing:
    # E * sum_e f_e P_e; the total loss adds both with their coefficients
    cfg = tiny(router_z_loss_coef=0.01)
    m = JambaForCausalLM(cfg, seed=0)
    with torch.no_grad():  # larger router logits, so a z-loss without its square differs clearly
        for layer in m.model.layers:
            if isinstance(layer.feed_forward, SparseMoE):
                layer.feed_forward.router.weight.mul_(20)
    logits = []
    for layer in m.model.layers:
        if isinstance(layer.feed_forward, SparseMoE):
            layer.feed_forward.router.register_forward_hook(
                lambda mod, i, o: logits.append(o.detach().float())
            )
    x = torch.randint(0, 97, (2, 25))
    out = m(x[:, :-1], labels=x[:, 1:])
    assert len(logits) == 2
    z = torch.stack([torch.logsumexp(lg, -1).pow(2).mean() for lg in logits]).mean()
    aux = []
    for lg in logits:
        p = torch.softmax(lg, -1)
        f = torch.zeros(4).index_add_(0, p.topk(2, -1).indices.flatten(), torch.ones(p.shape[0] * 2))
        aux.append(4 * (f / p.shape[0] * p.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, z, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.aux_loss, torch.stack(aux).mean(), rtol=1e-5, atol=0)
    want = out.lm_loss + cfg.router_aux_loss_coef * out.aux_loss + 0.01 * z
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    assert float(z) > 2 * float(torch.stack([torch.logsumexp(lg, -1).abs().mean() for lg in logits]).mean())
