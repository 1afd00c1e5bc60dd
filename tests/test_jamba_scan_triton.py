"""The Triton selective scan (jamba/scan_triton.py, op in jamba/scan_op.py) against selective_scan_ref: y and every
gradient, fp32, 1e-5 relative. On CPU the kernels run in Triton's interpreter (tests/conftest.py), at tiny shapes
and tilings small enough that every path runs: several segments and chunks, a ragged last chunk (L not a multiple
of T or K), a partial channel block (d not a multiple of the block)."""

import pytest
import torch
import triton  # noqa: F401 - a test extra: imported, not skipped (a broken install fails)

from jamba import scan_op
from jamba.scan import resolve_scan_backend, selective_scan_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, d, L, n, z=True, D=True, bias=True, seed=0, bc_time_major=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    A = -torch.rand(d, n, generator=g).to(DEV) * 4
    B, C = r(b, n, L), r(b, n, L)
    if bc_time_major:  # as the model passes them: [b, L, n] viewed as [b, n, L]
        B, C = r(b, L, n).transpose(1, 2), r(b, L, n).transpose(1, 2)
    ins = [r(b, d, L), r(b, d, L) * 0.5, A, B, C, r(d) if D else None, r(b, d, L) if z else None]
    ins.append(r(d) if bias else None)
    return [t.requires_grad_() if t is not None else None for t in ins]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check(ins, softplus=True, tol=1e-5):
    y = scan_op.selective_scan_triton(*ins, delta_softplus=softplus)
    y_ref = selective_scan_ref(*ins, delta_softplus=softplus)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert _rel(y, y_ref) < tol, _rel(y, y_ref)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    live = [t for t in ins if t is not None]
    got = torch.autograd.grad(y, live, gy)
    want = torch.autograd.grad(y_ref, live, gy)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape
        assert _rel(a, b) < tol, (i, _rel(a, b))
    return got


@pytest.fixture
def tiling(monkeypatch):
    def use(**kw):
        monkeypatch.setitem(scan_op.TILING, DEV, scan_op.ScanTiling(**kw))

    return use


@pytest.mark.parametrize(
    "n,z,D,bias,softplus,tile",
    [
        (4, True, True, True, True, dict(BD=4, BD_fwd=4, T_fwd=4, T=4, K=8)),
        (16, True, True, True, True, dict(BD=4, BD_fwd=2, T_fwd=2, T=2, K=4)),
        (4, False, False, False, False, dict(BD=2, BD_fwd=8, T_fwd=4, T=2, K=8)),
        (16, True, False, True, True, dict(BD=8, BD_fwd=4, T_fwd=8, T=4, K=16)),
        (
            4,
            True,
            True,
            True,
            True,
            dict(BD=4, BD_fwd=4, T_fwd=4, T=2, K=8, save_y=1),
        ),  # y saved by the forward
        (16, True, False, True, True, dict(BD=8, BD_fwd=4, T_fwd=8, T=4, K=16, save_y=1)),
        (4, True, True, True, True, dict(BD=4, BD_fwd=4, T_fwd=2, T=2, K=4, split=1)),
        (16, True, True, True, True, dict(BD=4, T_fwd=4, T=2, K=8, bwd=1)),  # the first backward layout
        (16, True, True, True, True, dict(BD=4, T_fwd=4, T=2, K=8, bwd=1, split_bwd=1, save_y=1)),
        (4, True, True, True, True, dict(BD=4, T_fwd=4, T=2, K=8, split=1, split_bwd=1)),
        (16, False, True, False, True, dict(BD=8, T_fwd=2, T=2, K=4, split=0, split_bwd=1)),
        (
            16,
            True,
            False,
            True,
            True,
            dict(BD=8, T_fwd=8, T=4, K=16, split=0, split_bwd=-1),
        ),  # 2x1 programs: split
    ],
)
def test_triton_scan_matches_reference(tiling, n, z, D, bias, softplus, tile):
    tiling(**tile)
    _check(_inputs(2, 6, 19, n, z=z, D=D, bias=bias), softplus=softplus)


def test_triton_scan_model_layouts(tiling):
    # u with a non-unit batch stride (the mixer's channel-major in_proj view) and time-major B, C
    tiling(BD=4, T_fwd=4, T=4, K=8)
    ins = _inputs(2, 5, 11, 4, bc_time_major=True)
    xz = torch.randn(10, 2, 11, device=DEV).permute(1, 0, 2)  # [b, 2d, L], strides (L, b*L, 1)
    ins[0] = xz[:, :5].detach().requires_grad_()
    ins[6] = xz[:, 5:].detach().requires_grad_()
    assert ins[0].stride(1) == 2 * 11 and ins[3].stride(1) == 1
    _check(ins)


def test_triton_scan_backward_is_deterministic(tiling):
    tiling(BD=4, T_fwd=4, T=4, K=8)
    ins = _inputs(2, 6, 13, 4)
    first = _check(ins)
    second = _check(ins)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_triton_scan_op_registration():
    # schema, fake (meta) implementation and autograd registration agree with the real kernels
    ins = [t.detach() if t is not None else None for t in _inputs(1, 4, 5, 4)]
    for i in (0, 1, 3, 4, 6):
        ins[i].requires_grad_()
    torch.library.opcheck(
        scan_op._scan_op,
        (*ins, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("save_y", [0, 1])
def test_triton_scan_bwd_fake_matches_real(tiling, save_y):
    # Inductor asserts each output's strides against the fake kernel's: a transposed dA once failed the compiled
    # model's backward on the GPU ("expected ... stride 1==16") while aot_eager passed
    ins = [t.detach() for t in _inputs(2, 6, 9, 4)]
    u, delta, A, B, C, D, z, bias = ins
    tiling(BD=4, BD_fwd=4, T_fwd=4, T=4, K=8, save_y=save_y)
    y, hs, yp = scan_op._scan_op(u, delta, A, B, C, D, z, bias, True)
    assert yp.shape == (y.shape if save_y else (0,))  # y before the gate, saved for the backward
    torch.library.opcheck(
        scan_op._scan_bwd_op,
        (torch.randn_like(y), u, delta, A, B, C, D, z, bias, hs, yp, True),
        test_utils=("test_faketensor",),
    )
    real = scan_op._scan_bwd_op(torch.randn_like(y), u, delta, A, B, C, D, z, bias, hs, yp, True)
    fake = scan_op._scan_bwd_fake(torch.randn_like(y), u, delta, A, B, C, D, z, bias, hs, yp, True)
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


def test_triton_scan_mixer_compiles_fullgraph(tiling):
    # the op is traced, not a graph break: a whole Mamba mixer compiles with fullgraph=True and equals eager
    from jamba import JambaForCausalLM
    from jamba.config import JambaConfig
    from jamba.runtime import Runtime

    tiling(BD=4, T_fwd=4, T=4, K=8)
    torch.manual_seed(0)
    cfg = JambaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=1, mamba_d_state=4, layer_pattern="M",
    )  # fmt: skip
    model = JambaForCausalLM(cfg, runtime=Runtime(scan_backend="triton"), device_type=DEV)
    mixer = model.model.layers[0].mamba.to(DEV)
    assert mixer.scan_backend == "triton"
    x = torch.randn(2, 9, 16, device=DEV, requires_grad=True)
    eager = mixer(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    out = compiled(x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_out, g_eager, rtol=1e-5, atol=1e-6)


def test_scan_backend_choice():
    assert resolve_scan_backend("auto", "cpu") == "torch"
    assert resolve_scan_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="runtime.scan_backend=mamba_ssm: mamba_ssm needs"):
        resolve_scan_backend("mamba_ssm", "cpu")
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_scan_backend("cuda", "cpu")
    from jamba.runtime import Runtime

    with pytest.raises(ValueError, match="runtime.scan_backend"):
        Runtime(scan_backend="fast").validate()


def test_deterministic_algorithms_avoid_the_kernels_that_sum_with_atomics(monkeypatch):
    """trainer.deterministic turns torch's deterministic algorithms on before the model is built: auto then
    takes our scan over mamba-ssm's, an explicit mamba_ssm is an error, the conv takes our Triton conv."""
    from jamba import scan

    monkeypatch.setattr(scan, "_mamba_scan", lambda *a, **k: None)  # as if mamba-ssm were installed
    monkeypatch.setattr(scan, "_cc1d", lambda *a, **k: None)
    monkeypatch.setattr(scan, "_INTERPRET", True)
    assert resolve_scan_backend("auto", "cuda") == "mamba_ssm"
    assert scan.conv_backend("cuda") == "causal_conv1d"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_scan_backend("auto", "cuda") == "triton"
        with pytest.raises(ValueError, match="mamba_ssm: mamba-ssm's scan backward is not deterministic"):
            resolve_scan_backend("mamba_ssm", "cuda")
        assert scan.conv_backend("cuda") == "triton"  # ours: no atomics
        assert scan.conv_backend("cuda", use_kernel=False) == "torch"
    finally:
        torch.use_deterministic_algorithms(before)


def test_scan_tiling_is_checked():
    with pytest.raises(ValueError, match="power of two"):
        scan_op.ScanTiling(BD=24)
    with pytest.raises(ValueError, match="ScanTiling.bwd must be 1 or 2"):
        scan_op.ScanTiling(bwd=3)
    with pytest.raises(ValueError, match="multiple"):
        scan_op.ScanTiling(T=8, K=4)
