"""How a run is spread over ranks and which training techniques it applies: the one ParallelConfig.

The trainer embeds it as its `parallel` group (train/config.py), `python -m parallel.plan` builds one from its
flags, and `deepspeed_config` (parallel/zero.py) takes its stage, so the three accept the same values.
`validate()` holds the checks a type cannot express; `check(world_size, num_experts)` the ones that need
the world and the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from jamba.config import CHECKPOINT_CHOICES

# The ZeRO stages a run may ask for: 1 (optimizer states partitioned) or 2 (+ gradients). A single rank runs
# a plain engine, stage SINGLE_RANK_STAGE (nothing to partition; see parallel/zero.py effective_zero_stage).
# Stage 3 is not offered: DeepSpeed refuses it with MoE layers and would gather every expert on every rank.
ZERO_STAGES = (1, 2)
SINGLE_RANK_STAGE = 0
# The one precision vocabulary: "bf16" is torch autocast to bf16 (fp32 weights, gradients and optimizer
# states; A_log, D and the dt bias stay fp32), never a cast of the module; "auto" is bf16 on a GPU that has
# it, fp32 elsewhere.
PRECISIONS = ("auto", "bf16", "fp32")
STATS_SCOPES = ("ep", "world")
COMPILE_MODES = ("auto", "layers", "none")


@dataclass
class ParallelConfig:
    zero_stage: int = (
        1  # DeepSpeed ZeRO over the data-parallel ranks: 1 (optimizer states) | 2 (and gradients)
    )
    expert_parallel_size: int = 1  # ranks that split each MoE layer's experts (parallel/expert_parallel.py)
    precision: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU | bf16 (autocast, fp32 weights) | fp32
    activation_checkpointing: str = "none"  # none | full | a mixer (mamba, attention, mamba2) | moe
    # torch.compile each decoder layer: auto = on a GPU only (CPU compiles take minutes for little gain)
    compile: str = "auto"  # auto | layers | none
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
    timeout_s: int = 600  # a collective waiting longer (e.g. a peer died) raises instead of hanging
    # Over which ranks the router statistics of the load-balancing loss are summed: "ep" (the ranks that
    # exchange tokens; free, the all-to-all synchronises them anyway) or "world" (the whole data-parallel
    # batch; the loss then does not depend on the EP size).
    router_stats_scope: str = "ep"

    def validate(self) -> None:
        """ValueError naming `parallel.<field>` and the fix."""

        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"parallel.{fld}: {msg}")

        ep = self.expert_parallel_size
        need(
            self.zero_stage in ZERO_STAGES,
            "zero_stage",
            f"must be one of {'|'.join(map(str, ZERO_STAGES))}, got {self.zero_stage!r} (stage 1 costs nothing "
            "over plain data parallelism; stage 3 is not supported: DeepSpeed refuses it with MoE layers)",
        )
        need(
            isinstance(ep, int) and not isinstance(ep, bool) and ep >= 1,
            "expert_parallel_size",
            f"must be an int >= 1, got {ep!r}",
        )
        for fld, choices in (
            ("precision", PRECISIONS),
            ("activation_checkpointing", CHECKPOINT_CHOICES),
            ("compile", COMPILE_MODES),
            ("device", ("auto", "cpu", "cuda")),
            ("backend", ("auto", "nccl", "gloo")),
            ("router_stats_scope", STATS_SCOPES),
        ):
            v = getattr(self, fld)
            need(v in choices, fld, f"must be one of {'|'.join(choices)}, got {v!r}")
        need(self.timeout_s > 0, "timeout_s", "must be > 0")

    def check(self, world_size: int, num_experts: int | None = None) -> None:
        """Cross-checks against the world and the model; raises ValueError naming the fix."""
        from .topology import check_expert_parallel

        self.validate()
        check_expert_parallel(world_size, self.expert_parallel_size, num_experts)

    def replace(self, **changes) -> ParallelConfig:
        return dataclasses.replace(self, **changes)


def effective_zero_stage(requested: int, world_size: int) -> int:
    """The ZeRO stage a run uses: `requested`, except SINGLE_RANK_STAGE (a plain DeepSpeed engine) on a single
    rank. There is nothing to partition there, and ZeRO's optimizer would keep a second fp32 copy of every
    weight (4 bytes per parameter: 9.9 GB for `bench`, the difference between 4 x 4096 fitting on an 80 GB GPU
    or not)."""
    return requested if world_size > 1 else SINGLE_RANK_STAGE


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'bf16' or 'fp32' for the device the run uses ('auto' decided here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"parallel.precision: must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a resolved precision (bf16: autocast)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32
