"""Expert weights and the grouped expert product.

Weights are fused as transformers stores them: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F].
Tokens arrive sorted by expert with `counts[e]` rows each; the fast path is one grouped matmul over all
local experts (torch._grouped_mm, or grouped_gemm when installed), the reference a loop over experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import grouped_gemm as _gg  # optional CUDA package
except Exception:  # noqa: BLE001
    _gg = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype under autocast (fp32 weights, bf16 math), else x's."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def experts_ref(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Per-expert loop: the definition, and the CPU path."""
    outs = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        if xe.shape[0] == 0:
            continue
        g, u = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


def experts_grouped(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """One grouped GEMM per projection over every local expert (no per-expert Python loop)."""
    if backend == "grouped_gemm" and _gg is not None:
        h = _gg.ops.gmm(x, gate_up, counts.cpu(), trans_b=True)
        g, u = h.chunk(2, dim=-1)
        return _gg.ops.gmm(F.silu(g) * u, down, counts.cpu(), trans_b=True)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn: int, use_kernels: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.use_kernels = use_kernels
        self.backend = "torch"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        if self.use_kernels and x.is_cuda and dt == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            # autocast does not cover _grouped_mm: cast by hand (a no-op for bf16 weights)
            return experts_grouped(
                x.to(dt), counts, self.gate_up_proj.to(dt), self.down_proj.to(dt), self.backend
            )
        return experts_ref(x, counts, self.gate_up_proj, self.down_proj)
