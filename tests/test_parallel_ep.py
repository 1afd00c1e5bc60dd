"""Expert parallelism on CPU/gloo (issue 5, parts 5a and 5c).

Each rank has different data. The EP run computes its local loss, backward, then the data-parallel average
(`allreduce_gradients`). The reference is one process running the unsharded model on the concatenated batch
of each router-statistics group and averaging over those groups (one group when ep == world or with
scope "world"). Loss, aux loss, dense gradients, all-gathered expert gradients and the gradient norm
must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from tiny import tiny_config

from jamba import JambaConfig, JambaForCausalLM
from jamba.experts import Experts, experts_backend_problem
from jamba.moe import local_dispatch
from jamba.runtime import Runtime
from parallel.apply import set_activation_checkpointing
from parallel.data_parallel import allreduce_gradients
from parallel.expert_parallel import (
    AllToAllDispatcher,
    apply_expert_parallel,
    gather_expert_grads,
    gather_full_state_dict,
    is_expert_param,
    load_full_state_dict,
)
from parallel.grad_norm import clip_grad_norm_, global_grad_norm
from parallel.topology import GroupLayout, make_topology

pytestmark = pytest.mark.distributed
CPU_BACKENDS = [
    b for b in ("grouped_mm",) if experts_backend_problem(b, "cpu", torch.float32, 32, 48) is None
]
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_cfg(**kw) -> JambaConfig:
    """The tiny model with attention and MoE in the last layer, larger router losses, the reference kernels."""
    base = dict(
        layer_pattern="M ME * *E",
        mamba_d_state=8,
        router_aux_loss_coef=0.05,
        router_z_loss_coef=0.01,
    )
    return tiny_config(**{**base, **kw})


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, 64, (2, 13), generator=g)
    return x[:, :-1], x[:, 1:]


RT = Runtime(use_kernels=False, scan_chunk_size=8)


def reference(cfg: JambaConfig, stat_groups: list[list[int]]) -> dict:
    """Single process (loop experts): mean over stats groups of the loss on each group's concatenated batch."""
    model = JambaForCausalLM(cfg, seed=0, runtime=RT)
    losses, auxes = [], []
    for ranks in stat_groups:
        x = torch.cat([batch(r)[0] for r in ranks])
        y = torch.cat([batch(r)[1] for r in ranks])
        out = model(x, labels=y)
        (out.loss / len(stat_groups)).backward()
        losses.append(out.loss.detach())
        auxes.append(out.aux_loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])).float()
    return dict(loss=torch.stack(losses).mean(), aux=auxes, grads=grads, norm=norm)


def check_ep(
    ep: int, scope: str = "ep", ckpt: str = "none", compile: bool = False, experts: str = "loop"
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_cfg()
    groups = make_topology(ep)
    stat_groups = groups.layout.all_ep_groups() if scope == "ep" else [list(range(world))]
    ref = reference(cfg, stat_groups)

    model = JambaForCausalLM(cfg, seed=0, runtime=RT.replace(experts_backend=experts), device_type="cpu")
    assert model.backends.experts == experts
    apply_expert_parallel(model, groups, stats_scope=scope)
    set_activation_checkpointing(model, ckpt)
    if compile:  # the trainer compiles on GPU after expert parallelism: dynamo must trace the dispatcher
        torch._dynamo.reset()
        model.compile_layers(backend="aot_eager")
    n_local = sum(1 for p in model.parameters() if is_expert_param(p))
    assert n_local == (4 if ep > 1 else 0)
    x, y = batch(rank)
    out = model(x, labels=y)
    out.loss.backward()
    allreduce_gradients(model.parameters(), groups)

    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref["loss"], **TOL)
    my_group = next(i for i, g in enumerate(stat_groups) if rank in g)
    torch.testing.assert_close(out.aux_loss.detach(), ref["aux"][my_group], **TOL)

    expert_grads = gather_expert_grads(model, groups)
    for n, p in model.named_parameters():
        got = expert_grads[n] if is_expert_param(p) else p.grad
        torch.testing.assert_close(
            got, ref["grads"][n], **TOL, msg=lambda m, n=n: f"ep={ep} {scope} {n}: {m}"
        )

    # 5(c): the norm counts each expert once and agrees on every rank; clipping by it matches too.
    norm = global_grad_norm(model.parameters(), ep_group=groups.ep_group)
    torch.testing.assert_close(norm, ref["norm"], **TOL)
    clip_grad_norm_(model.parameters(), max_norm=0.5 * ref["norm"].item(), ep_group=groups.ep_group)
    expert_grads = gather_expert_grads(model, groups)
    for n, p in model.named_parameters():
        got = expert_grads[n] if is_expert_param(p) else p.grad
        torch.testing.assert_close(got, ref["grads"][n] * 0.5, **TOL)

    # The full weights gathered from the shards are the unsharded model's, and load back into shards.
    full = gather_full_state_dict(model, groups)
    want = JambaForCausalLM(cfg, seed=0, runtime=RT).state_dict()
    for k in want:
        torch.testing.assert_close(full[k], want[k], rtol=0, atol=0)
    fresh = JambaForCausalLM(cfg, seed=1, runtime=RT)
    apply_expert_parallel(fresh, groups, stats_scope=scope)
    load_full_state_dict(fresh, full, groups.ep)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def _dispatch_case(
    groups,
    x_full: torch.Tensor,
    idx_full: torch.Tensor,
    w_full: torch.Tensor,
    rows: list[int],
    autocast: bool = False,
) -> None:
    """EP dispatch of this rank's rows equals local_dispatch of all rows (output and gradients)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _dispatch_compare(
            groups, x_full, idx_full, w_full, rows, dict(rtol=2e-2, atol=2e-2) if autocast else TOL
        )


def _dispatch_compare(groups, x_full, idx_full, w_full, rows, tol) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    full = Experts(4, 8, 16)
    torch.nn.init.normal_(full.gate_up_proj, std=0.3)
    torch.nn.init.normal_(full.down_proj, std=0.3)
    xf = x_full.clone().requires_grad_()
    y_ref = local_dispatch(xf, idx_full, w_full, full)
    y_ref.pow(2).sum().backward()

    El = groups.ep.num_local(4)
    mine = Experts(El, 8, 16)
    sl = slice(groups.ep.offset(4), groups.ep.offset(4) + El)
    with torch.no_grad():
        mine.gate_up_proj.copy_(full.gate_up_proj[sl])
        mine.down_proj.copy_(full.down_proj[sl])
    lo, hi = sum(rows[:rank]), sum(rows[: rank + 1])
    xl = x_full[lo:hi].clone().requires_grad_()
    y = AllToAllDispatcher(groups.ep_group, groups.ep, 4)(xl, idx_full[lo:hi], w_full[lo:hi], mine)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref[lo:hi], **tol)
    torch.testing.assert_close(xl.grad, xf.grad[lo:hi], **tol)
    for name in ("gate_up_proj", "down_proj"):
        g = getattr(mine, name).grad
        assert g is not None, f"{name}.grad is None on rank {rank}"
        gathered = [torch.empty_like(g) for _ in range(groups.ep.size)]
        dist.all_gather(gathered, g, group=groups.ep_group)
        torch.testing.assert_close(torch.cat(gathered), getattr(full, name).grad, **tol)


def check_dispatch_edge_cases() -> None:
    groups = make_topology(2)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 8, generator=g)
    w = torch.rand(6, 2, generator=g)
    # Every token to experts 0 and 1 (rank 0's): rank 1 receives nothing but must still join backward.
    idx = torch.tensor([[0, 1], [1, 0]] * 3)
    _dispatch_case(groups, x, idx, w, rows=[2, 4])
    _dispatch_case(groups, x, idx, w, rows=[2, 4], autocast=True)  # same wire dtype from every rank
    # Rank 1 has no tokens at all; rank 0's go everywhere.
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    _dispatch_case(groups, x, idx, w, rows=[6, 0])


def run_two_ranks() -> None:
    check_dispatch_edge_cases()
    check_ep(2)
    check_ep(2, ckpt="full")  # recomputation re-runs the all-to-alls inside backward
    check_ep(2, compile=True)
    for b in CPU_BACKENDS:  # each experts backend that runs on CPU, sharded, equals the single-rank loop
        check_ep(2, experts=b)


def run_four_ranks() -> None:
    check_ep(4)
    check_ep(2)  # two EP groups: aux over each group, the reference averages the two groups
    check_ep(2, scope="world")
    check_ep(1, scope="world")


@pytest.mark.timeout(210)
def test_expert_parallel_two_ranks():
    run_distributed(run_two_ranks, 2, timeout=180)


@pytest.mark.timeout(200)
def test_expert_parallel_four_ranks():
    run_distributed(run_four_ranks, 4, timeout=170)


def test_apply_expert_parallel_rejects_bad_sizes():
    # GroupLayout validation happens before any collective, so no process group is needed here.
    with pytest.raises(ValueError, match="does not divide num_experts=4"):
        GroupLayout(8, 8, num_experts=4)
