"""Expert weights and the grouped expert product, with its backends.

Weights are fused as transformers stores them: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F].
Tokens arrive sorted by expert with `counts[e]` rows each. Backends (chosen once per model, see
`resolve_experts_backend`; `Experts.backend` holds the choice and `forward` never re-decides):
  loop          one F.linear pair per expert: the definition; reads the counts back to the host
  grouped_mm    torch._grouped_mm, one kernel per projection over every local expert, no host sync
  grouped_gemm  the grouped_gemm package's gmm (CUDA, bf16; takes the counts on the host)
  megablocks    megablocks' block-sparse product through stk (CUDA, bf16; jamba/experts_megablocks.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import grouped_gemm as _gg  # optional CUDA package
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _gg = None

EXPERTS_BACKENDS = ("auto", "grouped_mm", "grouped_gemm", "loop", "megablocks")
# `auto` on CUDA: the first that can run, fastest first (benchmarks/results/gpu_experts_backends.md)
AUTO_CUDA_ORDER = ("grouped_mm", "grouped_gemm", "loop")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype under autocast (fp32 weights, bf16 math), else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def experts_ref(
    x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Per-expert loop: the definition (the `loop` backend)."""
    outs = []
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        if xe.shape[0] == 0:
            continue
        g, u = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])


def experts_grouped(
    x: torch.Tensor,
    counts: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    backend: str = "grouped_mm",
) -> torch.Tensor:
    """One grouped GEMM per projection over every local expert (no per-expert Python loop). Inputs must
    share one dtype (autocast does not cover these ops)."""
    if backend == "grouped_gemm":
        sizes = counts.cpu()  # gmm wants the group sizes on the host
        h = _gg.ops.gmm(x, gate_up, sizes, trans_b=True)
        g, u = h.chunk(2, dim=-1)
        return _gg.ops.gmm(F.silu(g) * u, down, sizes, trans_b=True)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)


def _megablocks():
    try:
        from . import experts_megablocks
    except Exception:  # noqa: BLE001 - megablocks or stk missing or broken
        return None
    return experts_megablocks if experts_megablocks.available() else None


def _grouped_mm_problem(device_type: str, dtype: torch.dtype, hidden: int, ffn: int) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if any((n * dtype.itemsize) % 16 for n in (hidden, 2 * ffn, ffn)):
        return f"hidden {hidden} and ffn {ffn} rows must be multiples of 16 bytes in {dtype}"
    try:  # one tiny call tells whether this build has the kernel for this device and dtype
        dev = torch.device(device_type)
        n = 16 // dtype.itemsize
        torch._grouped_mm(
            torch.zeros(2, n, device=dev, dtype=dtype),
            torch.zeros(2, n, n, device=dev, dtype=dtype),
            offs=torch.tensor([1, 2], device=dev, dtype=torch.int32),
        )
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
        return f"torch._grouped_mm fails on {device_type} in {dtype}: {str(e).splitlines()[0]}"
    return None


def experts_backend_problem(
    name: str, device_type: str, dtype: torch.dtype, hidden: int = 16, ffn: int = 16
) -> str | None:
    """Why backend `name` cannot run on `device_type` with matmuls in `dtype` (None: it can)."""
    if name not in EXPERTS_BACKENDS or name == "auto":
        return f"unknown experts backend {name!r} (choose from {'|'.join(EXPERTS_BACKENDS)})"
    if name == "loop":
        return None
    if name == "grouped_mm":
        return _grouped_mm_problem(device_type, dtype, hidden, ffn)
    if device_type != "cuda" or dtype != torch.bfloat16:
        return f"{name} runs on CUDA in bf16 only (here: {device_type}, {str(dtype).replace('torch.', '')})"
    if name == "grouped_gemm" and _gg is None:
        return "the grouped_gemm package is not installed"
    if name == "megablocks":
        mb = _megablocks()
        if mb is None:
            return "megablocks (with stanford-stk) is not installed or does not import"
        return mb.problem(hidden, ffn)
    return None


def resolve_experts_backend(
    name: str, device_type: str, dtype: torch.dtype, hidden: int = 16, ffn: int = 16
) -> tuple[str, str | None]:
    """(backend, note): `auto` takes `loop` off CUDA and the first of AUTO_CUDA_ORDER that can run on it,
    with a note saying why a faster one could not (the caller logs it: a fallback is never silent). An
    explicit backend that cannot run is a ValueError naming why."""
    if name == "auto":
        if device_type != "cuda":
            return "loop", None
        skipped = []
        for b in AUTO_CUDA_ORDER:
            problem = experts_backend_problem(b, device_type, dtype, hidden, ffn)
            if problem is None:
                return b, ("; ".join(skipped) + f": using {b}") if skipped else None
            skipped.append(f"{b}: {problem}")
    problem = experts_backend_problem(name, device_type, dtype, hidden, ffn)
    if problem:
        raise ValueError(f"experts_backend={name}: {problem}")
    return name, None


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, ffn: int) -> None:
        super().__init__()
        self.num_experts = num_experts  # held by this rank (all of them without expert parallelism)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.backend = "loop"  # set once by jamba.runtime.apply_runtime

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.backend == "loop":
            return experts_ref(x, counts, self.gate_up_proj, self.down_proj)
        # autocast does not cover these ops: cast by hand (a no-op for weights already in that dtype)
        dt = _compute_dtype(x)
        gu, dn = self.gate_up_proj.to(dt), self.down_proj.to(dt)
        if self.backend == "megablocks":
            return _megablocks().experts_megablocks(x.to(dt), counts, gu, dn)
        return experts_grouped(x.to(dt), counts, gu, dn, self.backend)
