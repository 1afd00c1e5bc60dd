"""Expert parallelism for `jamba.moe.SparseMoE`, applied in place to a built model (torchtitan style).

Each rank of an EP group of size P keeps E/P contiguous experts of every MoE layer. Per layer and step:
  1. route locally (the model's router), sort the (token, slot) pairs by global expert id;
  2. all-to-all the per-expert counts, then the token rows with split sizes (dropless: any counts);
  3. regroup the received rows by local expert, run the local grouped matmul (`Experts.forward`);
  4. all-to-all the outputs back (the reverse splits), weight them by the router and scatter-add.
The router statistics of the load-balancing loss are summed over the EP group (or the world) with a
differentiable all-reduce, so the aux loss equals the single-rank value on the group's concatenated batch.

Gradient convention (tested in tests/test_parallel_ep.py): every rank adds the same replicated aux loss
to its local loss; gradients are then averaged over all R ranks (dense: over the DP world; experts: summed
over their EDP group and divided by R, which is what DeepSpeed ZeRO-1/2 do). The all-reduce's backward sums
the upstream gradients of the stats group, so the averaged gradient equals the gradient of
  mean_r lm_loss_r + coef * mean_{stats groups g} aux_g,
which for one stats group (ep == world, or scope "world") is exactly the single-process gradient on the
concatenated batch (equal token counts per rank).

Expert parameters are tagged the way DeepSpeed recognises them: `p.allreduce = False`,
`p.group_name = "ep_size_<P>"` (see `deepspeed.moe.utils.is_moe_param`). That name is DeepSpeed's key, written
for it and never read back here: our code takes the EP position and groups from the `Topology`.
"""

from __future__ import annotations

import torch
from torch import nn

from jamba.experts import Experts
from jamba.moe import SparseMoE

from .collectives import all_gather_cat, all_reduce_sum, all_to_all
from .topology import EPPosition, Topology

EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")


def deepspeed_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of this EP size (the key of its group tables and `p.group_name`)."""
    return f"ep_size_{ep_size}"


class AllToAllDispatcher:
    """`SparseMoE.dispatcher` for experts spread over an EP group (dropless, variable splits)."""

    def __init__(self, group, ep: EPPosition, num_experts: int) -> None:
        self.group, self.ep_size, self.num_experts = group, ep.size, num_experts
        self.num_local = ep.num_local(num_experts)

    def __call__(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, experts: Experts
    ) -> torch.Tensor:
        P, El = self.ep_size, self.num_local
        k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by global expert = by owner
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E], rows for each global expert
        recv_counts = torch.empty_like(counts)
        torch.distributed.all_to_all_single(recv_counts, counts, group=self.group)  # [P * El]: (src, local e)
        send_splits = counts.view(P, El).sum(1).tolist()
        recv_mat = recv_counts.view(P, El)
        recv_splits = recv_mat.sum(1).tolist()

        # One dtype on the wire, the same on every rank: under autocast the experts compute in the autocast
        # dtype anyway (and the grouped GEMM wants it), and a rank whose experts got no rows must not send
        # back a different dtype than the others (the all-to-all would mix bytes).
        wire = _wire_dtype(x)
        x_recv = all_to_all(x[token].to(wire), recv_splits, send_splits, self.group)  # by (src rank, expert)
        if El > 1:  # regroup by local expert, keeping the source order inside each expert
            local_id = torch.arange(El, device=x.device).repeat(P)
            perm = torch.argsort(torch.repeat_interleave(local_id, recv_mat.reshape(-1)), stable=True)
            y_grp = experts(x_recv[perm], recv_mat.sum(0))
            y_recv = y_grp[torch.argsort(perm)]
        else:
            y_recv = experts(x_recv, recv_mat.sum(0))
        if sum(recv_splits) == 0 and torch.is_grad_enabled():
            # No rows for any local expert (the CPU path then returns a constant). The received rows and the
            # expert weights must still join the graph, or this rank would skip the backward all-to-alls the
            # others run (a hang) and leave the experts' .grad None (DeepSpeed's hooks would never fire).
            y_recv = x_recv * 0 + _zero_touch(experts).to(wire)
        y = all_to_all(y_recv.to(wire), send_splits, recv_splits, self.group)  # back in `order`
        y = y * topk_w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _wire_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _zero_touch(experts: Experts) -> torch.Tensor:
    t = experts.gate_up_proj.reshape(-1)[:1].sum() + experts.down_proj.reshape(-1)[:1].sum()
    return t * 0


class StatsReducer:
    """`SparseMoE.reduce_stats`: sum (counts, prob_sum, z_sum, n_tokens) over a group in one all-reduce;
    prob_sum and z_sum keep their gradient (see the module docstring)."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, counts, prob_sum, z_sum, n):
        E = prob_sum.shape[0]
        packed = torch.cat(
            [prob_sum.double(), z_sum.double().reshape(1), counts.double(), n.double().reshape(1)]
        )
        total = all_reduce_sum(packed, self.group)
        prob = total[:E].to(prob_sum.dtype)
        z = total[E].to(z_sum.dtype)
        cnt = total[E + 1 : 2 * E + 1].detach().round().to(counts.dtype)
        n_all = total[2 * E + 1].detach().to(n.dtype)
        return cnt, prob, z, n_all


def moe_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMoE)]


def apply_expert_parallel(model: nn.Module, topo: Topology, stats_scope: str = "ep") -> None:
    """Shard every SparseMoE of `model` over the EP group of `topo`, in place. Every rank must call it.

    Expert weights may be real (each rank keeps its slice; the rest is freed) or on the meta device
    (then materialise and initialise after). `stats_scope`: "ep" or "world" (see ParallelConfig)."""
    if stats_scope not in ("ep", "world"):
        raise ValueError(f"stats_scope must be 'ep' or 'world', got {stats_scope!r}")
    ep = topo.ep
    stats_group = topo.ep_group if stats_scope == "ep" else topo.dp_group
    for name, moe in moe_layers(model):
        experts = moe.experts
        E = moe.num_experts
        if experts.num_experts != E:
            raise RuntimeError(
                f"{name}: expert parallelism is applied already ({experts.num_experts} of {E})"
            )
        if E % ep.size:
            raise ValueError(f"{name}: num_experts={E} is not divisible by expert_parallel_size={ep.size}")
        if ep.size > 1:
            start, El = ep.offset(E), ep.num_local(E)
            for pname in EXPERT_PARAM_NAMES:
                old = getattr(experts, pname)
                new = nn.Parameter(old.detach()[start : start + El].clone(), requires_grad=old.requires_grad)
                new.allreduce = False  # DeepSpeed: an expert parameter, reduced over its EDP group only
                new.group_name = deepspeed_group_name(ep.size)
                setattr(experts, pname, new)
            experts.num_experts = El
            moe.dispatcher = AllToAllDispatcher(topo.ep_group, ep, E)
        if ep.size > 1 or stats_scope == "world":
            moe.reduce_stats = StatsReducer(stats_group)


# ---- whole-model views of sharded experts ------------------------------------------------------------


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def gather_full_state_dict(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """The unsharded state dict (every expert), on every rank: expert tensors are all-gathered over the EP
    group. Collective: every rank calls it. For export and checkpoint consolidation."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if topo.ep.size == 1:
        return sd
    for mname, ex in _expert_modules(model).items():
        for pname in EXPERT_PARAM_NAMES:
            key = f"{mname}.{pname}" if mname else pname
            sd[key] = all_gather_cat(getattr(ex, pname).detach(), topo.ep_group)
    return sd


def gather_expert_grads(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Full-size gradients of the expert parameters (zeros where .grad is None), all-gathered over EP."""
    out = {}
    for mname, ex in _expert_modules(model).items():
        for pname in EXPERT_PARAM_NAMES:
            p = getattr(ex, pname)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out[f"{mname}.{pname}"] = all_gather_cat(g.detach(), topo.ep_group) if topo.ep.size > 1 else g
    return out


def load_full_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], ep: EPPosition, strict: bool = True
):
    """Load an unsharded state dict into a (possibly) expert-sharded model: each rank copies its slice
    (`ep`) of every expert tensor. No communication."""
    sd = dict(state_dict)
    for mname, ex in _expert_modules(model).items():
        for pname in EXPERT_PARAM_NAMES:
            key = f"{mname}.{pname}" if mname else pname
            if key in sd:
                full = sd[key]
                if full.shape[0] != ex.num_experts * ep.size:
                    raise ValueError(
                        f"{key}: state dict has {full.shape[0]} experts, the model {ex.num_experts * ep.size}"
                    )
                sd[key] = full[ep.experts(full.shape[0]).start : ep.experts(full.shape[0]).stop]
    return model.load_state_dict(sd, strict=strict)
