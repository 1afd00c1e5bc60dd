"""Process groups for expert parallelism, as rank arithmetic first and torch.distributed groups second.

Layout (the same as DeepSpeed's default "E + D" topology, so its ZeRO optimizer and ours agree):
  - expert-parallel (EP) groups are blocks of `ep` consecutive ranks: [0..ep-1], [ep..2ep-1], ...;
    the ranks of one block hold different experts of each MoE layer and exchange tokens by all-to-all;
    consecutive ranks are usually on one node, so the all-to-all stays on NVLink when ep <= GPUs per node;
  - expert-data-parallel (EDP) groups take every ep-th rank: [j, j+ep, j+2ep, ...]; their ranks hold the
    same experts, and expert gradients are averaged over them only;
  - the data-parallel (DP) group for dense parameters is the whole world.
Rank r therefore has ep_rank = r % ep, edp_rank = r // ep and holds experts
[ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class GroupLayout:
    """Pure rank arithmetic for (world_size, ep_size); no processes needed."""

    world_size: int
    ep_size: int
    num_experts: int | None = None

    def __post_init__(self) -> None:
        check_expert_parallel(self.world_size, self.ep_size, self.num_experts)

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for this EP size (the key of its group dicts and of `p.group_name`)."""
        return f"ep_size_{self.ep_size}"

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep_size

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
        n = self.experts_per_rank()
        return range(self.ep_rank(rank) * n, (self.ep_rank(rank) + 1) * n)


@dataclass
class ProcessGroups:
    """This rank's groups. `ep_group`/`edp_group` are torch ProcessGroups (None only when ep_size == 1
    for EP, whose group would be this rank alone)."""

    layout: GroupLayout
    rank: int
    ep_group: object | None
    edp_group: object | None
    dp_group: object | None = None  # None: the default (world) group
    ep_ranks: list[int] = field(default_factory=list)
    edp_ranks: list[int] = field(default_factory=list)
    ds_singleton_group: object | None = None  # ep_size == 1 only: this rank's EP group for DeepSpeed

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def edp_size(self) -> int:
        return self.layout.edp_size

    @property
    def group_name(self) -> str:
        return self.layout.group_name


# ep_size -> this rank's groups; lets `grad_norm` and `expert_parallel` find a group from `p.group_name`.
_REGISTRY: dict[int, ProcessGroups] = {}


def init_process_groups(
    ep_size: int, num_experts: int | None = None, register_deepspeed: bool = False
) -> ProcessGroups:
    """Create (once per ep_size) the EP and EDP groups on every rank; every rank must call this, in the same
    order. With register_deepspeed, the same group objects are also handed to `deepspeed.utils.groups` so
    a DeepSpeed engine reduces expert gradients over exactly these EDP groups."""
    if not dist.is_initialized():
        raise RuntimeError(
            "init_process_groups: torch.distributed is not initialized "
            "(call torch.distributed.init_process_group, or deepspeed.init_distributed, first)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = GroupLayout(world, ep_size, num_experts)
    pg = _REGISTRY.get(ep_size)
    if pg is None:
        ep_group = edp_group = None
        if ep_size > 1:  # every rank takes part in creating every group (torch.distributed's rule)
            for ranks in layout.all_ep_groups():
                g = dist.new_group(ranks)
                if rank in ranks:
                    ep_group = g
        for ranks in layout.all_edp_groups():
            g = dist.new_group(
                ranks
            )  # a group of its own even when it spans the world (DeepSpeed needs that)
            if rank in ranks:
                edp_group = g
        pg = ProcessGroups(
            layout, rank, ep_group, edp_group, None, layout.ep_group_ranks(rank), layout.edp_group_ranks(rank)
        )
        _REGISTRY[ep_size] = pg
    elif num_experts is not None:
        check_expert_parallel(world, ep_size, num_experts)
    if register_deepspeed:
        register_with_deepspeed(pg)
    return pg


def get_process_groups(ep_size: int) -> ProcessGroups:
    if ep_size not in _REGISTRY:
        raise RuntimeError(
            f"no process groups for expert_parallel_size={ep_size}: call init_process_groups first"
        )
    return _REGISTRY[ep_size]


def group_for_name(group_name: str) -> ProcessGroups:
    """`p.group_name` ('ep_size_4') -> this rank's ProcessGroups for that EP size."""
    try:
        ep = int(group_name.rsplit("_", 1)[-1])
    except ValueError:
        raise ValueError(f"not an expert group name: {group_name!r} (expected 'ep_size_<n>')") from None
    return get_process_groups(ep)


def reset_process_groups() -> None:
    """Forget the registry (tests that re-initialise torch.distributed in one process)."""
    _REGISTRY.clear()


def register_with_deepspeed(pg: ProcessGroups) -> None:
    """Put our EP/EDP groups into `deepspeed.utils.groups` under DeepSpeed's name `ep_size_<ep>`.

    DeepSpeed's `_create_expert_and_data_parallel` would build the same layout with its own new_group
    calls; handing it our objects instead guarantees one set of groups. If groups under that name exist
    already (someone called DeepSpeed first), their ranks must match ours."""
    from deepspeed.utils import groups as ds_groups

    name = pg.group_name
    ep_group = pg.ep_group if pg.ep_group is not None else _singleton_group(pg)
    edp_group = pg.edp_group
    for table, ranks_table, group, ranks in (
        (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS, ep_group, pg.ep_ranks),
        (
            ds_groups._EXPERT_DATA_PARALLEL_GROUP,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            edp_group,
            pg.edp_ranks,
        ),
    ):
        if name in table:
            have = list(ranks_table[name])
            if have != list(ranks):
                raise RuntimeError(
                    f"DeepSpeed already has groups named {name} with ranks {have}, ours are "
                    f"{list(ranks)}: use the default (expert-before-data) DeepSpeed topology"
                )
            continue
        table[name] = group
        ranks_table[name] = list(ranks)


def _singleton_group(pg: ProcessGroups):
    # ep_size == 1: DeepSpeed still wants an EP group per name; one group per rank, created by all ranks.
    if pg.ds_singleton_group is None:
        for r in range(pg.layout.world_size):
            g = dist.new_group([r])
            if r == pg.rank:
                pg.ds_singleton_group = g
    return pg.ds_singleton_group
