"""Make a DeepSpeed engine treat our expert-parallel `SparseMoE` layers as MoE, without its MoE layer.

Why not `deepspeed.moe.layer.MoE`: its gate renormalises the top-2 weights (Jamba does not) and pads every
expert to a capacity (drops or pads tokens; Jamba's MoE is dropless), and it refuses ZeRO-3 anyway. We keep
our router, dispatch and grouped matmul, and only tell DeepSpeed what it needs to reduce gradients right.

What the engine needs, and how we give it (see docs/parallel.md for the DeepSpeed code paths):
  1. `engine.has_moe_layers` is set only if some module `isinstance(m, deepspeed.moe.layer.MoE)`; without it
     ZeRO-1/2 would partition and average expert gradients over the whole world, mixing *different* experts
     of equal shape: silently wrong. We attach to each SparseMoE a parameter-free `DeepSpeedMoEMarker`
     (a MoE subclass that skips MoE.__init__), so the state dict is unchanged.
  2. Expert parameters tagged `allreduce=False`, `group_name="ep_size_<ep>"` (done by apply_expert_parallel)
     and optimizer param groups with `moe=True` and that name: build them with
     `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (every group needs a "name").
  3. `deepspeed.utils.groups` must hold our EP/EDP groups under that name: `register_with_deepspeed`.
"""

from __future__ import annotations

from torch import nn

from jamba.moe import SparseMoE

from .expert_parallel import deepspeed_group_name
from .topology import Topology

_MARKER_CLS = None


def _marker_class():
    global _MARKER_CLS
    if _MARKER_CLS is None:
        from deepspeed.moe.layer import MoE

        class DeepSpeedMoEMarker(MoE):
            """Parameter-free stand-in that makes `isinstance(m, MoE)` true for the engine."""

            def __init__(self, num_experts: int, ep_size: int) -> None:
                nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
                self.num_experts, self.ep_size = num_experts, ep_size
                self.num_local_experts = num_experts // ep_size
                self.expert_group_name = deepspeed_group_name(ep_size)
                self.enable_expert_tensor_parallelism = False
                self.use_residual = False

            def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_) -> None:
                # The engine calls this to create groups; ours exist already (register_with_deepspeed).
                if use_data_before_expert_parallel_:
                    raise ValueError(
                        "use_data_before_expert_parallel is not supported: parallel/ lays out "
                        "expert-parallel groups as consecutive ranks (DeepSpeed's default)"
                    )
                from deepspeed.utils import groups as ds_groups

                if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
                    raise RuntimeError(
                        f"DeepSpeed has no groups named {self.expert_group_name}: call "
                        "parallel.deepspeed_moe.prepare_deepspeed_moe before deepspeed.initialize"
                    )

            def forward(self, *args, **kwargs):
                raise RuntimeError("DeepSpeedMoEMarker is a tag for DeepSpeed's engine; it is never called")

            def extra_repr(self) -> str:
                return f"num_experts={self.num_experts}, ep_size={self.ep_size}"

        _MARKER_CLS = DeepSpeedMoEMarker
    return _MARKER_CLS


def register_with_deepspeed(topo: Topology) -> None:
    """Put our EP/EDP groups into `deepspeed.utils.groups` under DeepSpeed's name `ep_size_<ep>`.

    DeepSpeed's `_create_expert_and_data_parallel` would build the same layout with its own new_group
    calls; handing it our objects instead guarantees one set of groups. If groups under that name exist
    already (someone called DeepSpeed first), their ranks must match ours."""
    from deepspeed.utils import groups as ds_groups

    name, lay = deepspeed_group_name(topo.ep.size), topo.layout
    for table, ranks_table, group, ranks in (
        (
            ds_groups._EXPERT_PARALLEL_GROUP,
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
            topo.ep_group,
            lay.ep_group_ranks(topo.rank),
        ),
        (
            ds_groups._EXPERT_DATA_PARALLEL_GROUP,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            topo.edp_group,
            lay.edp_group_ranks(topo.rank),
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


def prepare_deepspeed_moe(model: nn.Module, topo: Topology) -> int:
    """Register our groups with DeepSpeed and tag every SparseMoE for its engine. Call after
    apply_expert_parallel and before deepspeed.initialize, on every rank. Returns the number of layers
    tagged (0 when ep_size == 1: experts are then ordinary data-parallel parameters)."""
    ep = topo.ep.size
    if ep == 1:
        return 0
    register_with_deepspeed(topo)
    cls = _marker_class()
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE):
            if m.experts.num_experts * ep != m.num_experts:
                raise RuntimeError(f"{name}: call apply_expert_parallel(model, topology) first")
            if not hasattr(m, "ds_moe_marker"):
                m.ds_moe_marker = cls(m.num_experts, ep)
            n += 1
    return n
