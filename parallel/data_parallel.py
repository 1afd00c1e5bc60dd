"""Data-parallel gradient averaging without DeepSpeed (tests, ZeRO-0 debugging runs).

Convention shared with DeepSpeed ZeRO-1/2: every gradient is divided by the world size R; dense gradients
are summed over the world, expert gradients over their expert-data-parallel group only. Expert gradients
then carry (1/R) * sum of the contributions of all R ranks' tokens (the all-to-all already brought the
EP group's tokens to the expert), i.e. the gradient of the mean of the per-rank losses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from .expert_parallel import is_expert_param
from .topology import Topology


@torch.no_grad()
def allreduce_gradients(parameters: Iterable[torch.Tensor], topo: Topology) -> None:
    """Average .grad in place over data parallelism (expert parameters over their EDP group)."""
    dp_group = topo.dp_group
    world = dist.get_world_size(dp_group)
    for p in parameters:
        if p.grad is None:
            raise RuntimeError(
                "allreduce_gradients: a parameter has no .grad; every rank must hold a gradient "
                "for every parameter (use zeros) or the collectives would mismatch"
            )
        group = topo.edp_group if is_expert_param(p) else dp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)
