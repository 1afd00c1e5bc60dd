"""parallel/: spreads a built Jamba model over ranks and applies the training techniques. The model (jamba/)
knows nothing of this.

- config.ParallelConfig                  the knobs (ZeRO stage, EP size, precision, checkpointing, compile)
- topology.make_topology / Topology      this rank, its device, its EP position (EPPosition) and groups
- apply.apply_parallelism                 expert parallelism, activation checkpointing, compile, in order
- expert_parallel.apply_expert_parallel  shard experts, all-to-all dispatch, EP-wide router statistics
- deepspeed_moe.prepare_deepspeed_moe    make DeepSpeed's engine reduce expert gradients right
- grad_norm.clip_grad_norm_              the global norm with each expert counted once
- plan (python -m parallel.plan)         the smallest plan that fits, groups, ZeRO partitioning, memory per GPU
DeepSpeed is imported only by deepspeed_moe and zero.
"""

from .config import PRECISIONS, ZERO_STAGES, ParallelConfig
from .expert_parallel import (
    apply_expert_parallel,
    gather_full_state_dict,
    is_expert_param,
    load_full_state_dict,
)
from .grad_norm import clip_grad_norm_, global_grad_norm
from .topology import EPPosition, GroupLayout, Topology, check_expert_parallel, make_topology

__all__ = [
    "EPPosition",
    "GroupLayout",
    "PRECISIONS",
    "ParallelConfig",
    "Topology",
    "ZERO_STAGES",
    "apply_expert_parallel",
    "check_expert_parallel",
    "clip_grad_norm_",
    "gather_full_state_dict",
    "global_grad_norm",
    "is_expert_param",
    "load_full_state_dict",
    "make_topology",
]
