"""The training techniques, applied to a built model in one fixed order (torchtitan's parallelize step):

  1. expert parallelism (shards the experts: must precede anything that traces or wraps the layers)
  2. activation checkpointing (which layers recompute in backward)
  3. torch.compile of each decoder layer (compiles what 1-2 left)
ZeRO comes with the DeepSpeed engine afterwards (train/build.py). None of this is stored in the model's
config: model_config.json describes the weights only.
"""

from __future__ import annotations

import logging

from torch import nn

from jamba.config import CHECKPOINT_CHOICES

from .config import ParallelConfig
from .topology import Topology

log = logging.getLogger("parallel.apply")


def set_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Which decoder layers of a JambaForCausalLM recompute in backward: none|full|mamba|attention|moe."""
    if mode not in CHECKPOINT_CHOICES:
        raise ValueError(
            f"activation checkpointing must be one of {'|'.join(CHECKPOINT_CHOICES)}, got {mode!r}"
        )
    model.model.checkpointing = mode


def apply_parallelism(model: nn.Module, pcfg: ParallelConfig, topo: Topology) -> list[str]:
    """Apply `pcfg`'s techniques to `model` in place, in the order above; every rank calls it. Returns (and
    logs) what was applied."""
    done = []
    if topo.ep.size > 1:
        from .deepspeed_moe import prepare_deepspeed_moe
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, topo, pcfg.router_stats_scope)
        prepare_deepspeed_moe(model, topo)  # else ZeRO would average expert gradients over the world
        done.append(f"expert parallelism over {topo.ep.size} ranks")
    set_activation_checkpointing(model, pcfg.activation_checkpointing)
    if pcfg.activation_checkpointing != "none":
        done.append(f"activation checkpointing '{pcfg.activation_checkpointing}'")
    if pcfg.compile == "layers" or (pcfg.compile == "auto" and topo.device.type == "cuda"):
        model.compile_layers()
        done.append("torch.compile of every decoder layer (the first steps include the compile time)")
    log.info("training techniques: %s", "; ".join(done) or "none")
    return done
