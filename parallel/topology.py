"""The run's topology (in the way of torchtitan's ParallelDims): this rank, its device, its expert-parallel
position and its process groups; one frozen object, made once per process and passed to whatever needs it.

Layout (the same as DeepSpeed's default "E + D" topology, so its ZeRO optimizer and ours agree):
  - expert-parallel (EP) groups are blocks of `ep` consecutive ranks: [0..ep-1], [ep..2ep-1], ...;
    the ranks of one block hold different experts of each MoE layer and exchange tokens by all-to-all;
    consecutive ranks are usually on one node, so the all-to-all stays on NVLink when ep <= GPUs per node;
  - expert-data-parallel (EDP) groups take every ep-th rank: [j, j+ep, j+2ep, ...]; their ranks hold the
    same experts, and expert gradients are averaged over them only;
  - the data-parallel (DP) group for dense parameters is the whole world.
Rank r therefore has ep_rank = r % ep, edp_rank = r // ep and holds experts
[ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer (`EPPosition`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def check_expert_parallel(world_size: int, ep_size: int, num_experts: int | None = None) -> None:
    """Raise ValueError unless ep_size is a positive divisor of both world_size and num_experts."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive int, got {world_size!r}")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"expert-parallel size must be a positive int, got {ep_size!r}")
    if world_size % ep_size:
        ok = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the world size {world_size}; "
            f"choose one of {ok}" + (f" that also divides num_experts={num_experts}" if num_experts else "")
        )
    if num_experts is not None and num_experts % ep_size:
        ok = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide num_experts={num_experts} "
            f"(each rank must hold a whole number of experts); choose one of {ok}"
        )


@dataclass(frozen=True)
class EPPosition:
    """This rank's place among the ranks that split the experts: the one form of it (set when the topology is
    made; the model, checkpoints and the optimizer read it from there)."""

    size: int = 1  # ranks in this rank's EP group
    rank: int = 0  # this rank's index in it

    def num_local(self, num_experts: int) -> int:
        return num_experts // self.size

    def offset(self, num_experts: int) -> int:
        """Global id of the first expert (of every MoE layer) this rank holds."""
        return self.rank * self.num_local(num_experts)

    def experts(self, num_experts: int) -> range:
        return range(self.offset(num_experts), self.offset(num_experts) + self.num_local(num_experts))


@dataclass(frozen=True)
class GroupLayout:
    """Pure rank arithmetic for (world_size, ep_size); no processes needed (the planner uses it alone)."""

    world_size: int
    ep_size: int
    num_experts: int | None = None

    def __post_init__(self) -> None:
        check_expert_parallel(self.world_size, self.ep_size, self.num_experts)

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    def position(self, rank: int) -> EPPosition:
        return EPPosition(self.ep_size, rank % self.ep_size)

    def ep_group_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ep_size
        return list(range(start, start + self.ep_size))

    def edp_group_ranks(self, rank: int) -> list[int]:
        return list(range(rank % self.ep_size, self.world_size, self.ep_size))

    def all_ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    def all_edp_groups(self) -> list[list[int]]:
        return [list(range(j, self.world_size, self.ep_size)) for j in range(self.ep_size)]

    def experts_per_rank(self) -> int:
        if self.num_experts is None:
            raise ValueError("GroupLayout.num_experts is not set")
        return self.num_experts // self.ep_size

    def local_experts(self, rank: int) -> range:
        """Global ids of the experts (of every MoE layer) that `rank` holds: a contiguous block."""
        return self.position(rank).experts(self.experts_per_rank() * self.ep_size)


@dataclass(frozen=True)
class Topology:
    """This process's rank, device, EP position and groups. The groups are None where they would be the
    whole world (dp_group always; edp_group with ep == 1) or this rank alone (ep_group with ep == 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep: EPPosition = EPPosition()
    ep_group: object | None = field(default=None, compare=False, repr=False)
    edp_group: object | None = field(default=None, compare=False, repr=False)
    dp_group: object | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.world_size, self.ep.size)

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep.size

    @property
    def writes_experts(self) -> bool:
        """The one rank per EP position that writes its expert files: edp_rank 0 (ranks 0..ep-1)."""
        return self.rank < self.ep.size


def make_topology(
    ep_size: int = 1, device: torch.device | str | None = None, local_rank: int | None = None
) -> Topology:
    """The topology of this process in the current default process group (a world of one without one),
    creating the EP and EDP groups: every rank must call it, in the same order (torch.distributed's rule)."""
    if not dist.is_initialized():
        check_expert_parallel(1, ep_size)
        return Topology(0, 1, local_rank or 0, torch.device(device or "cpu"))
    world, rank = dist.get_world_size(), dist.get_rank()
    lay = GroupLayout(world, ep_size)
    ep_group = edp_group = None
    if ep_size > 1:
        for ranks in lay.all_ep_groups():
            g = dist.new_group(ranks)
            if rank in ranks:
                ep_group = g
        for ranks in lay.all_edp_groups():
            g = dist.new_group(
                ranks
            )  # a group of its own even when it spans the world (DeepSpeed needs that)
            if rank in ranks:
                edp_group = g
    return Topology(
        rank,
        world,
        rank if local_rank is None else local_rank,
        torch.device(device or "cpu"),
        lay.position(rank),
        ep_group,
        edp_group,
    )
