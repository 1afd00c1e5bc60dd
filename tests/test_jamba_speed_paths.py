"""Speed options that must not change the numbers: feed-forward token chunking, torch.compile of the layers.
CPU compiles with the aot_eager backend (traces and runs the same graphs as inductor, without the minutes of
C++ code generation); the GPU test compiles with inductor, the trainer's default."""

import pytest
import torch
from test_jamba_model import tiny

from jamba import JambaForCausalLM
from jamba.runtime import Runtime
from parallel.apply import set_activation_checkpointing


def _grads(m, x, **kw):
    out = m(x[:, :-1], labels=x[:, 1:], **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


def _assert_same(a, b, x, loss_tol: float, grad_rtol: float, grad_atol: float):
    """Same loss and every gradient for models a and b on batch x; returns both outputs."""
    oa, ga = _grads(a, x)
    ob, gb = _grads(b, x)
    torch.testing.assert_close(ob.loss, oa.loss, rtol=loss_tol, atol=loss_tol)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=grad_rtol, atol=grad_atol, msg=n)
    return oa, ob


def _pair(cfg_a, cfg_b, device="cpu", rt_a=None, rt_b=None, ckpt="none"):
    a = JambaForCausalLM(cfg_a, seed=0, runtime=rt_a).to(device)
    b = JambaForCausalLM(cfg_b, seed=0, runtime=rt_b).to(device)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        set_activation_checkpointing(m, ckpt)
    return a, b


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_ff_chunking_is_exact(ckpt):
    # chunk of 7 tokens: ragged last chunk, MoE and dense feed-forwards both chunked
    a, b = _pair(tiny(), tiny(), rt_b=Runtime(ff_chunk_size=7), ckpt=ckpt)
    oa, ob = _assert_same(a, b, torch.randint(0, 97, (2, 21)), 1e-6, 1e-5, 1e-6)
    torch.testing.assert_close(ob.aux_loss, oa.aux_loss, rtol=1e-6, atol=1e-6)
    counts_a = [s["tokens_per_expert"] for s in oa.router_stats]
    counts_b = [s["tokens_per_expert"] for s in ob.router_stats]
    assert all(torch.equal(p, q) for p, q in zip(counts_a, counts_b, strict=True))


def test_ff_chunk_size_is_validated():
    with pytest.raises(ValueError, match="runtime.ff_chunk_size"):
        JambaForCausalLM(tiny(), runtime=Runtime(ff_chunk_size=-1))


def test_compiled_layers_match_eager_and_keep_names():
    torch._dynamo.reset()
    a, b = _pair(tiny(), tiny())
    b.compile_layers(backend="aot_eager")
    assert list(a.state_dict()) == list(b.state_dict())  # checkpoints and DeepSpeed see the same names
    _assert_same(a, b, torch.randint(0, 97, (2, 17)), 1e-5, 1e-4, 1e-5)


@pytest.mark.gpu
def test_compiled_layers_match_eager_gpu():
    torch._dynamo.reset()
    # every token to all 4 experts: under bf16 a top-2 choice flips for a few tokens, differently in eager and
    # compiled, and moves those experts' gradients by more than rounding (measured on an H200, session 6)
    cfg = tiny(hidden_size=64, intermediate_size=128, num_experts_per_tok=4)
    ref, eager = _pair(cfg, cfg, device="cuda", ckpt="mamba")
    compiled = JambaForCausalLM(cfg, seed=0).cuda()
    compiled.load_state_dict(ref.state_dict())
    set_activation_checkpointing(compiled, "mamba")
    compiled.compile_layers()
    x = torch.randint(0, 97, (2, 257), device="cuda")
    # fp32: inductor's fused kernels against eager, to rounding
    o_ref, g_ref = _grads(ref, x)
    o_c, g_c = _grads(compiled, x)
    torch.testing.assert_close(o_c.loss, o_ref.loss, rtol=1e-4, atol=1e-4)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp(min=1e-8))  # noqa: E731
    bad = {n: rel(g_c[n], g_ref[n]) for n in g_ref if rel(g_c[n], g_ref[n]) > 1e-3}
    assert not bad, bad
    # bf16 autocast (the trainer's recipe): compiled is as close to fp32 as eager is, parameter by parameter
    # (bf16 rounding alone moves small gradients by percents, so an absolute bound would not tell a bug)
    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        o_e, g_e = _grads(eager, x)
        o_c, g_c = _grads(compiled, x)
    assert abs(float(o_c.loss) - float(o_ref.loss)) <= 2 * abs(float(o_e.loss) - float(o_ref.loss)) + 1e-3
    worse = {
        n: (rel(g_c[n], g_ref[n]), rel(g_e[n], g_ref[n]))
        for n in g_ref
        if rel(g_c[n], g_ref[n]) > 2 * rel(g_e[n], g_ref[n]) + 1e-3
    }
    assert not worse, worse


def _counting(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call is counted (the fast path must really be taken)."""
    calls, fn = [], getattr(module, name)

    def wrapper(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.gpu
def test_model_with_kernels_matches_reference_path_gpu(monkeypatch):
    # The Mamba mixer hands the kernels channel-major views (no transposing copies): same numbers as the
    # pure-PyTorch path, fp32, forward and every gradient; under bf16 autocast the experts run torch's
    # grouped matmul, as close to fp32 as the reference path under autocast is. Every kernel must be there.
    import jamba.experts
    import jamba.scan
    from jamba.scan import kernels_available

    missing = [k for k, ok in kernels_available().items() if not ok]
    assert not missing, f"kernels not installed: {missing} (the `gpu` extra)"
    assert hasattr(torch, "_grouped_mm"), f"torch {torch.__version__} has no torch._grouped_mm"
    scans = _counting(monkeypatch, jamba.scan, "_mamba_scan")
    convs = _counting(monkeypatch, jamba.scan, "_cc1d")
    grouped = _counting(monkeypatch, jamba.experts, "experts_grouped")
    # all 4 experts per token, as in test_compiled_layers_match_eager_gpu: under bf16 a top-2 choice flips for a
    # few tokens between the two paths (layer 3's router and experts then moved 4-5% against 0.9%, H200 session 7)
    cfg = tiny(hidden_size=64, intermediate_size=128, num_experts_per_tok=4)
    # b's backends are chosen for bf16 matmuls (the default on a GPU): the experts take grouped_mm throughout
    a, b = _pair(cfg, cfg, device="cuda", rt_a=Runtime(use_kernels=False))
    assert b.backends.experts == "grouped_mm", b.backends
    x = torch.randint(0, 97, (3, 130), device="cuda")
    oa, ga = _grads(a, x)
    assert not (scans or convs or grouped)  # the reference path takes none
    ob, gb = _grads(b, x)
    assert scans and convs and grouped
    torch.testing.assert_close(ob.loss, oa.loss, rtol=1e-4, atol=1e-4)
    rel = lambda p, q: float((p - q).norm() / q.norm().clamp(min=1e-8))  # noqa: E731
    for n in ga:
        assert rel(gb[n], ga[n]) < 1e-3, (n, rel(gb[n], ga[n]))
    for m in (a, b):
        m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        oa16, ga16 = _grads(a, x)
        ob16, gb16 = _grads(b, x)
    assert len(grouped) > 2, "bf16 autocast did not reach the grouped matmul"
    assert abs(float(ob16.loss) - float(oa.loss)) <= 2 * abs(float(oa16.loss) - float(oa.loss)) + 1e-2
    worse = {
        n: (rel(gb16[n], ga[n]), rel(ga16[n], ga[n]))
        for n in ga
        if rel(gb16[n], ga[n]) > 2 * rel(ga16[n], ga[n]) + 1e-2
    }
    assert not worse, worse


def test_residual_dtype_under_autocast():
    # residual_in_fp32=False: the stream (and so every checkpointed layer input) is bf16 under autocast
    seen = {}
    for flag in (True, False):
        m = JambaForCausalLM(tiny(residual_in_fp32=flag), seed=0)
        dtypes = []
        for layer in m.model.layers:
            layer.register_forward_pre_hook(lambda mod, args, d=dtypes: d.append(args[0].dtype))
        x = torch.randint(0, 97, (2, 17))
        with torch.autocast("cpu", torch.bfloat16):
            out = m(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        assert torch.isfinite(out.loss)
        seen[flag] = (set(dtypes), float(out.lm_loss))
    assert seen[True][0] == {torch.float32} and seen[False][0] == {torch.bfloat16}
    assert abs(seen[True][1] - seen[False][1]) < 5e-2 * abs(seen[True][1])


def test_blocked_scan_in_the_model_is_exact():
    # scan_block_size shorter than the sequence: the PyTorch scan runs in blocks (bounded memory), same numbers
    a, b = _pair(tiny(), tiny(), rt_b=Runtime(scan_block_size=6))
    _assert_same(a, b, torch.randint(0, 97, (2, 21)), 1e-6, 1e-5, 1e-6)
