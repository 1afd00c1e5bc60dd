"""The DeepSpeed side of a run: its config dict (ZeRO stage, precision, clipping, batch) and the optimizer's
parameter groups (weight decay split, and DeepSpeed's MoE groups for expert-parallel parameters).

Precision "bf16" (parallel/config.py PRECISIONS) is DeepSpeed's `torch_autocast`, not its `bf16` mode: the latter casts the whole module to
bf16, including A_log, D and the dt bias that Mamba needs in fp32 (bf16 instability; see jamba/mamba.py).
With autocast the weights, gradients of non-Linear parameters and optimizer states stay fp32 and the
matmuls run in bf16.
"""

from __future__ import annotations

from torch import nn

from .config import SINGLE_RANK_STAGE, ZERO_STAGES

# Plain data classes inside DeepSpeed's ZeRO optimizer files; allow-listed for torch.load(weights_only=True).
SAFE_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def skip_single_rank_allreduce(engine, world_size: int) -> None:
    """On one rank there is nothing to all-reduce, yet DeepSpeed's stage-0 backward still flattens every
    gradient into buckets, "all-reduces" them, scales by 1/world and copies them back: four passes over the
    gradients (17 ms of a 375 ms step of the 2.47B `bench` model on an H100). Turn that path off there."""
    if world_size == 1 and not engine.zero_optimization():
        engine.enable_backward_allreduce = False


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    precision: str,
    on_gpu: bool,
) -> dict:
    """The `config` of `deepspeed.initialize` for a client optimizer (we pass our own AdamW)."""
    if zero_stage not in (SINGLE_RANK_STAGE, *ZERO_STAGES):  # after effective_zero_stage
        raise ValueError(f"zero_stage must be one of {(SINGLE_RANK_STAGE, *ZERO_STAGES)}, got {zero_stage}")
    if precision not in ("fp32", "bf16"):  # resolved (parallel.config.resolve_precision): no "auto" here
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,  # required by DeepSpeed's MoE path under ZeRO-2
            "reduce_scatter": True,
            "overlap_comm": on_gpu,
            "reduce_bucket_size": 200_000_000,
            "allgather_bucket_size": 200_000_000,
        },
        # Our optimizer is torch AdamW plus a skip switch (train/optim.py); DeepSpeed checks the exact type.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # train/ does the logging
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},  # every rank must save under the same tag
    }
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, decay and no-decay (the model names the latter: norms, biases, A_log, D, dt bias);
    expert parameters of an expert-parallel model (`allreduce == False`, `group_name`, set by
    parallel/expert_parallel.py) move to DeepSpeed MoE groups, which ZeRO reduces over the expert-data
    -parallel group only."""
    no_decay = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else set()
    decay_params, plain_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain_params if name in no_decay else decay_params).append(p)
    groups = [
        {"name": "decay", "params": decay_params, "weight_decay": weight_decay},
        {"name": "no_decay", "params": plain_params, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (about 100 s on a fresh machine)
    that only its inference path uses; training collectives go through torch.distributed. Call before
    deepspeed.init_distributed / the first engine."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
