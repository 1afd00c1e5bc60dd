"""parallel/: spreads a built Jamba model over ranks. The model (jamba/) knows nothing of this.

- config.ParallelConfig                 the knobs (EP size, ZeRO stage, precision), validated
- groups.init_process_groups            EP / expert-data / data-parallel groups (+ DeepSpeed registration)
- expert_parallel.apply_expert_parallel  shard experts, all-to-all dispatch, EP-wide router statistics
- deepspeed_moe.prepare_deepspeed_moe   make DeepSpeed's engine reduce expert gradients right
- grad_norm.clip_grad_norm_              the global norm with each expert counted once
- plan (python -m parallel.plan)         groups, experts per rank, ZeRO partitioning, memory per GPU
DeepSpeed is imported only by deepspeed_moe and groups.register_with_deepspeed.
"""

from .config import ParallelConfig
from .expert_parallel import (
    apply_expert_parallel,
    gather_full_state_dict,
    is_expert_param,
    load_full_state_dict,
)
from .grad_norm import clip_grad_norm_, global_grad_norm
from .groups import GroupLayout, ProcessGroups, check_expert_parallel, init_process_groups

__all__ = [
    "GroupLayout",
    "ParallelConfig",
    "ProcessGroups",
    "apply_expert_parallel",
    "check_expert_parallel",
    "clip_grad_norm_",
    "gather_full_state_dict",
    "global_grad_norm",
    "init_process_groups",
    "is_expert_param",
    "load_full_state_dict",
]
