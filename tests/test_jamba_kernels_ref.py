"""Each fast path against its reference. CPU: the chunked scan against the per-token loop, and the
grouped expert product against the per-expert loop; GPU versions run on the GPU machine."""

import pytest
import torch

from jamba.experts import experts_grouped, experts_ref
from jamba.scan import (
    causal_conv1d,
    causal_conv1d_ref,
    kernels_available,
    selective_scan,
    selective_scan_blocked,
    selective_scan_chunked,
    selective_scan_ref,
)


def _scan_inputs(b=2, d=6, L=37, n=4, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    A = (-torch.rand(d, n, generator=g) * 4).to(device).requires_grad_()
    return (r(b, d, L), r(b, d, L), A, r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d))


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_scan_matches_reference(chunk):
    ins = _scan_inputs()
    y_ref, last_ref = selective_scan_ref(*ins, delta_softplus=True, return_last_state=True)
    y, last = selective_scan_chunked(*ins, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(y_ref, ins, g), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [1, 5, 16, 36])
def test_blocked_scan_matches_reference(block):
    # state carried across blocks (ragged last block), each block recomputed in backward
    ins = _scan_inputs()
    y_ref, last_ref = selective_scan_ref(*ins, delta_softplus=True, return_last_state=True)
    y, last = selective_scan_blocked(
        *ins, delta_softplus=True, return_last_state=True, chunk_size=4, block_size=block
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(y_ref, ins, g), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_scan_dispatch_uses_blocks_for_long_sequences(monkeypatch):
    import jamba.scan as scan

    calls = []
    monkeypatch.setattr(scan, "selective_scan_blocked", lambda *a, **k: calls.append(k["block_size"]))
    ins = [t.detach() for t in _scan_inputs(L=37)]
    scan.selective_scan(*ins, use_kernel=False, block_size=36)
    assert calls == [36]
    scan.selective_scan(*ins, use_kernel=False, block_size=37)  # fits in one block: the plain chunked scan
    assert calls == [36]


def test_chunked_scan_survives_large_decay():
    # delta * |A| of 50 per step would overflow a naive exp(cumsum) formulation.
    ins = [t.detach() for t in _scan_inputs(L=64)]
    ins[1] = ins[1].abs() * 0 + 5.0
    ins[2] = ins[2] * 0 - 10.0
    y = selective_scan_chunked(*ins, delta_softplus=False, chunk_size=32)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(*ins, delta_softplus=False), rtol=1e-5, atol=1e-5)


def test_experts_cpu_reference_handles_empty_experts():
    x = torch.randn(10, 8)
    counts = torch.tensor([0, 6, 0, 4])
    gu, dn = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    y = experts_ref(x, counts, gu, dn)
    assert y.shape == (10, 8)
    for e, rows in ((1, slice(0, 6)), (3, slice(6, 10))):  # every expert's rows, in expert order
        g, u = (x[rows] @ gu[e].T).chunk(2, -1)
        torch.testing.assert_close(y[rows], (torch.nn.functional.silu(g) * u) @ dn[e].T)


gpu = pytest.mark.gpu


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-8))


# On a GPU the kernels these tests name must be there (the `gpu` extra): a missing one fails, it does not
# skip, and nothing compares the reference with itself.
@gpu
def test_mamba_ssm_scan_matches_reference_gpu():
    assert kernels_available()["mamba_ssm"], "mamba-ssm is not installed (pip install mamba-ssm)"
    ins = _scan_inputs(b=2, d=64, L=512, n=16, device="cuda")
    y = selective_scan(*ins, use_kernel=True)
    y_ref = selective_scan_chunked(*ins, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(y_ref, ins, g), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def _conv_matches_reference(fn, x, w, b):
    """fn(x, w, b) against causal_conv1d_ref: y to 1e-4, the gradients of x, w and b to 1e-3."""
    y, y_ref = fn(x, w, b), causal_conv1d_ref(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for name, a, r in zip(
        "xwb", torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g), strict=True
    ):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3, msg=name)


@gpu
def test_causal_conv1d_kernel_matches_reference_gpu():
    assert kernels_available()["causal_conv1d"], "causal-conv1d is not installed (pip install causal-conv1d)"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w, b = (
        torch.randn(*s, device="cuda", generator=gen).requires_grad_() for s in ((2, 64, 300), (64, 4), (64,))
    )
    _conv_matches_reference(causal_conv1d, x, w, b)


@gpu
def test_causal_conv1d_op_compiles_on_the_mixer_layout_gpu():
    # jamba::causal_conv1d on the mixer's channel-major view (strides L, b*L, 1): fake, schema and autograd
    # registration agree with the kernels, and a fullgraph compile (no graph break) equals the reference
    from jamba import conv_op

    assert conv_op.available(), "causal-conv1d is not installed (pip install causal-conv1d)"
    gen = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(2 * 64, 2, 300, device="cuda", generator=gen).permute(1, 0, 2)
    x = xz[:, :64].detach().requires_grad_()
    w = (torch.randn(64, 4, device="cuda", generator=gen) * 0.5).requires_grad_()
    b = torch.randn(64, device="cuda", generator=gen).requires_grad_()
    assert not x.is_contiguous()
    torch.library.opcheck(conv_op._conv_op, (x, w, b))
    _conv_matches_reference(torch.compile(conv_op.causal_conv1d_kernel, fullgraph=True), x, w, b)


@gpu
def test_grouped_mm_matches_reference_gpu():
    assert hasattr(torch, "_grouped_mm"), f"torch {torch.__version__} has no torch._grouped_mm"
    torch.manual_seed(0)
    counts = torch.tensor([100, 0, 37, 300, 1, 64, 0, 10], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(8, 2 * 128, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    dn = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    ins = [t.requires_grad_() for t in (x, gu, dn)]
    ins_ref = [t.detach().float().requires_grad_() for t in ins]
    ref = experts_ref(ins_ref[0], counts, *ins_ref[1:])
    out = experts_grouped(ins[0], counts, *ins[1:])
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 2e-2
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, ins, g.bfloat16())
    grads_ref = torch.autograd.grad(ref, ins_ref, g)
    for name, a, r in zip(("x", "gate_up_proj", "down_proj"), grads, grads_ref, strict=True):
        assert _rel(a, r) < 2e-2, (name, _rel(a, r))
    # experts without tokens get zero gradients
    assert not grads[1][[1, 6]].any() and not grads[2][[1, 6]].any()
