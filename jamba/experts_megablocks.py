"""The `megablocks` experts backend: megablocks' block-sparse expert product (its CUDA ops build the
topology, stanford-stk's Triton kernels multiply), on our layout.

Rows sorted by expert are copied into a layout where each expert's rows are padded to a multiple of BLOCK;
the [padded tokens, E * F] intermediate is block-sparse (a row block only meets its expert's F columns).
Optional: `available()` is False unless megablocks (built for this torch: see docs/model.md) and stk import.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import stk
    import stk.ops
    from megablocks import ops as mb_ops
except Exception:  # noqa: BLE001 - any import failure means "not available"
    stk = mb_ops = None

BLOCK = 128  # megablocks' block size


def available() -> bool:
    return stk is not None


def problem(hidden: int, ffn: int) -> str | None:
    if ffn % BLOCK or hidden % BLOCK:
        return f"hidden {hidden} and ffn {ffn} must be multiples of megablocks' block {BLOCK}"
    return None


def _topology(padded_bins: torch.Tensor, padded_tokens: int, ffn: int, num_experts: int, dtype):
    """stk's description of the block-sparse [padded_tokens, E * F] matrix (as megablocks' dMoE builds it)."""
    block_rows, blocks_per_row = padded_tokens // BLOCK, ffn // BLOCK
    dev = padded_bins.device
    offsets = torch.arange(0, block_rows * blocks_per_row + 1, blocks_per_row, dtype=torch.int32, device=dev)
    column_indices = mb_ops.topology(padded_bins, BLOCK, block_rows, blocks_per_row)
    data = torch.empty(column_indices.numel(), BLOCK, BLOCK, dtype=dtype, device="meta")
    shape = (padded_tokens, ffn * num_experts)
    row_indices = stk.ops.row_indices(shape, data, offsets, column_indices)
    # the transposed view, for the backward's products
    end_bit = max(int(math.ceil(math.log2(max(2, shape[1] // BLOCK)))), 1)
    _, gather_indices = mb_ops.sort(column_indices.int(), end_bit)
    column_indices_t = row_indices.gather(0, gather_indices.long())
    nnz = mb_ops.inclusive_cumsum(mb_ops.histogram(column_indices, shape[1] // BLOCK), 0)
    offsets_t = torch.cat([torch.zeros(1, dtype=torch.int32, device=dev), nnz.reshape(-1)])
    return stk.Matrix(
        shape, data, row_indices, column_indices, offsets, column_indices_t, offsets_t, gather_indices.int()
    )


def experts_megablocks(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    E, two_f, H = gate_up.shape
    ffn = two_f // 2
    counts = counts.to(torch.int32)
    padded = mb_ops.round_up(counts, BLOCK)
    padded_bins = mb_ops.inclusive_cumsum(padded, 0).reshape(-1)
    padded_tokens = int(padded_bins[-1])  # the block-row count sizes the topology (megablocks syncs here too)
    # where each sorted row goes in the padded layout
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts.long(), output_size=x.shape[0])
    shift = (padded_bins - padded) - (torch.cumsum(counts, 0) - counts)
    dest = torch.arange(x.shape[0], device=x.device) + shift.long()[expert]
    xp = x.new_zeros(padded_tokens, H).index_copy(0, dest, x)
    topo = _topology(padded_bins, padded_tokens, ffn, E, x.dtype)
    w1 = gate_up[:, :ffn].reshape(E * ffn, H)
    v1 = gate_up[:, ffn:].reshape(E * ffn, H)
    w2 = down.transpose(1, 2).reshape(E * ffn, H)
    g = stk.ops.sdd(xp, w1.t(), topo)
    u = stk.ops.sdd(xp, v1.t(), topo)
    act = stk.Matrix(
        g.size(),
        F.silu(g.data),
        g.row_indices,
        g.column_indices,
        g.offsets,
        g.column_indices_t,
        g.offsets_t,
        g.block_offsets_t,
    )
    y = stk.ops.dsd(stk.ops.mul(act, u), w2)
    return y.index_select(0, dest)
