"""The global gradient norm under expert parallelism, and clipping by it.

After the data-parallel reduction every rank holds the same dense gradients, and the ranks of one
expert-data-parallel group hold the same expert gradients; the experts of a layer are spread over the EP
group. The true norm of the full gradient therefore is
    ||g||^2 = sum_dense g^2  (local, counted once)  +  all_reduce_EP( sum_local_experts g^2 )
Each expert is counted exactly once: summing over the EP group visits every expert once, and no sum over
the EDP group (where experts repeat) is taken. Two common bugs this avoids: taking only the local experts
(the norm then differs per rank, so ranks clip differently and replicas drift) and all-reducing the expert
part over the whole world (experts counted R/ep times).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .expert_parallel import is_expert_param


def _params(parameters) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return [p for p in parameters if p.grad is not None]


def global_grad_norm(
    parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0, ep_group=None
) -> torch.Tensor:
    """Norm of the whole model's (already data-parallel-reduced) gradient, the same on every rank.

    Expert parameters are those tagged by `apply_expert_parallel` (`p.allreduce is False`); `ep_group` is
    their EP group (the Topology's). Collective over the EP group when there are experts."""
    params = _params(parameters)
    norm_type = float(norm_type)
    dense = [p.grad.detach() for p in params if not is_expert_param(p)]
    experts = [p.grad.detach() for p in params if is_expert_param(p)]
    if experts and ep_group is None:
        raise ValueError("global_grad_norm: expert parameters need their ep_group (Topology.ep_group)")
    device = params[0].grad.device if params else torch.device("cpu")

    def part(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        if math.isinf(norm_type):
            return torch.stack([g.abs().max().double() for g in grads]).max()
        return torch.stack([g.double().norm(norm_type) ** norm_type for g in grads]).sum()

    total = part(dense)
    if experts:
        local = part(experts)
        if dist.get_world_size(ep_group) > 1:
            dist.all_reduce(
                local, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=ep_group
            )
        total = torch.maximum(total, local) if math.isinf(norm_type) else total + local
    norm = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    return norm.float()


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    ep_group=None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / (norm + eps)), like torch.nn.utils.clip_grad_norm_ but with
    the expert-parallel norm; returns the norm before clipping (identical on every rank)."""
    params = _params(parameters)
    norm = global_grad_norm(params, norm_type, ep_group)
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm
