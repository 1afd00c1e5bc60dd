"""Autograd-aware collectives: the backward of each is the collective that makes gradients exact.

- `all_to_all(x, out_splits, in_splits, group)`: variable-size rows (dropless MoE); backward is the reverse
  all-to-all (the gradient of a row goes back to the rank that sent it).
- `all_reduce_sum(x, group)`: y = sum over the group of x; backward all-reduces (sums) the incoming gradients,
  i.e. dL/dx_r = sum_q dL_q/dy_q, the true gradient of sum_q L_q when every rank's loss L_q reads y.

Ordering: every rank creates these autograd nodes in the same order in forward; PyTorch's autograd engine
runs the nodes of one device in decreasing creation order, so the backward collectives are issued in the
same order on every rank, also when they sit on side branches (router statistics) or are recomputed
under non-reentrant activation checkpointing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _a2a(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows [sum(in_splits), ...] -> rows [sum(out_splits), ...]; in_splits[j] rows go to group rank j."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, list(out_splits), list(in_splits), group)
    return _a2a(x, list(out_splits), list(in_splits), group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum over the group (see the module docstring for the gradient convention)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllReduceSum.apply(x, group)
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


def all_gather_cat(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank of the group along `dim` (not differentiable)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
