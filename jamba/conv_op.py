"""`jamba::causal_conv1d`: causal-conv1d's CUDA kernels (depthwise causal conv, then SiLU) as one functional
torch.library custom op with a fake implementation and autograd, so torch.compile traces a Mamba mixer
through the conv as it does through our scan (jamba/scan_op.py). causal-conv1d's own op writes into an `out=`
tensor that keeps x's strides; the mixer's channel-major view of in_proj's output is not contiguous, and
Dynamo refuses that ("Attempted to call op with non-contiguous `out=` tensor"): a graph break in every layer.
The reference is jamba.scan.causal_conv1d_ref; tests/test_jamba_kernels_ref.py compares them on a GPU."""

from __future__ import annotations

import torch

try:  # CUDA only, optional (the `gpu` extra)
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function as _bwd_fn
    from causal_conv1d.cpp_functions import causal_conv1d_fwd_function as _fwd_fn
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fwd_fn = _bwd_fn = None


def available() -> bool:
    return _fwd_fn is not None


def _time_rows(x: torch.Tensor) -> torch.Tensor:
    # the kernels take time-contiguous rows (the mixer's layout) or channel-last; anything else is copied
    return x if x.stride(-1) == 1 or x.stride(1) == 1 else x.contiguous()


@torch.library.custom_op("jamba::causal_conv1d", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _fwd_fn(_time_rows(x), weight, bias, None, None, None, True)


@_conv_op.register_fake
def _conv_fake(x, weight, bias):
    return torch.empty_like(_time_rows(x))


@torch.library.custom_op("jamba::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db, _ = _bwd_fn(
        _time_rows(x), weight, bias, _time_rows(dout), None, None, None, None, False, True
    )
    return dx, dw, db if db is not None else weight.new_empty(0)


@_conv_bwd_op.register_fake
def _conv_bwd_fake(x, weight, bias, dout):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(_time_rows(x)), torch.empty_like(weight), db


def register_conv_autograd(op: str, bwd_op) -> None:
    """Autograd for a conv op (x, weight, bias) -> y whose backward op returns (dx, dweight, dbias or an empty
    tensor): this one and jamba/conv_triton.py's."""

    def setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.has_bias = bias is not None

    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = bwd_op(x, weight, bias, dout)
        return dx, dw, db if ctx.has_bias else None

    torch.library.register_autograd(op, backward, setup_context=setup)


register_conv_autograd("jamba::causal_conv1d", _conv_bwd_op)


def causal_conv1d_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv) of x [b, d, L] with weight [d, w] and bias [d], in x's dtype."""
    return _conv_op(x, weight.contiguous(), bias.contiguous() if bias is not None else None)
