"""How a run is spread over ranks: one plain dataclass, validated at construction.

`train/` (or its Hydra-side config) builds a `ParallelConfig`; the cross-checks that need the world size
and the model (EP divides both, ZeRO-3 only without EP) live in `check(world_size, num_experts)` so a bad
combination fails before any process group or tensor exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
STATS_SCOPES = ("ep", "world")


@dataclass
class ParallelConfig:
    # Ranks that hold different experts of each MoE layer (tokens travel between them by all-to-all).
    expert_parallel_size: int = 1
    # DeepSpeed ZeRO stage for the optimizer: 0 (replicated), 1 (optimizer states), 2 (+ gradients),
    # 3 (+ parameters; only with expert_parallel_size == 1).
    zero_stage: int = 1
    # "auto": bf16 on a GPU that supports it, fp32 otherwise (CPU tests).
    precision: str = "auto"
    # Over which ranks the router statistics of the load-balancing loss are summed: "ep" (the ranks that
    # exchange tokens; the choice, free because the all-to-all synchronises them anyway) or
    # "world" (the whole data-parallel batch; the loss then does not depend on the EP size).
    router_stats_scope: str = "ep"

    def __post_init__(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"ParallelConfig.{fld}: {msg}")

        ep = self.expert_parallel_size
        need(
            isinstance(ep, int) and not isinstance(ep, bool) and ep >= 1,
            "expert_parallel_size",
            f"must be an int >= 1, got {ep!r}",
        )
        need(
            self.zero_stage in ZERO_STAGES,
            "zero_stage",
            f"must be one of {ZERO_STAGES}, got {self.zero_stage!r}",
        )
        need(
            self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}"
        )
        need(
            self.router_stats_scope in STATS_SCOPES,
            "router_stats_scope",
            f"must be one of {STATS_SCOPES}, got {self.router_stats_scope!r}",
        )
        need(
            not (self.zero_stage == 3 and ep > 1),
            "zero_stage",
            f"ZeRO stage 3 cannot be combined with expert_parallel_size={ep}: DeepSpeed's engine refuses "
            "ZeRO-3 for MoE layers and stage 3 would gather every expert onto every rank anyway. "
            "Use zero_stage 1 or 2 with expert parallelism, or expert_parallel_size=1 with stage 3",
        )

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Cross-checks against the world and the model; raises ValueError naming the fix."""
        from .groups import check_expert_parallel

        check_expert_parallel(world_size, self.expert_parallel_size, num_experts)

    def resolved_precision(self, device: torch.device | str | None = None) -> str:
        """'bf16' or 'fp32' for the device the run uses ('auto' decided here)."""
        if self.precision != "auto":
            return self.precision
        dev = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"

    def replace(self, **changes) -> ParallelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> ParallelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ParallelConfig: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**d)
