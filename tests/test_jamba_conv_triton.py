"""The deterministic Triton causal conv (jamba/conv_triton.py) against causal_conv1d_ref: y and every gradient,
fp32, on CPU in Triton's interpreter (tests/conftest.py), at shapes with a partial channel block and a partial
time block, on the Mamba mixer's channel-major layout."""

import pytest
import torch
import triton  # noqa: F401 - a test extra: imported, not skipped

from jamba import conv_triton
from jamba.scan import causal_conv1d_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, d, L, w, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(2 * d, b, L, generator=g).to(DEV).permute(1, 0, 2)  # [b, 2d, L], strides (L, b*L, 1)
    x = xz[:, :d].detach().requires_grad_()
    wt = (torch.randn(d, w, generator=g) * 0.5).to(DEV).requires_grad_()
    bs = torch.randn(d, generator=g).to(DEV).requires_grad_() if bias else None
    return x, wt, bs


@pytest.mark.parametrize("b,d,L,w,bias", [(2, 20, 300, 4, True), (1, 16, 128, 4, False), (3, 5, 7, 2, True)])
def test_triton_conv_matches_reference(b, d, L, w, bias):
    x, wt, bs = _inputs(b, d, L, w, bias)
    y = conv_triton.causal_conv1d_triton(x, wt, bs)
    y_ref = causal_conv1d_ref(x, wt, bs)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    live = [t for t in (x, wt, bs) if t is not None]
    got = torch.autograd.grad(y, live, gy)
    want = torch.autograd.grad(y_ref, live, gy)
    for name, a, r in zip("xwb", got, want, strict=False):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)
    again = torch.autograd.grad(conv_triton.causal_conv1d_triton(x, wt, bs), live, gy)
    assert all(torch.equal(a, c) for a, c in zip(got, again, strict=True))  # bitwise repeatable


def test_triton_conv_op_registration():
    x, wt, bs = _inputs(2, 6, 9, 4)
    torch.library.opcheck(
        conv_triton._conv_op,
        (x, wt, bs),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
