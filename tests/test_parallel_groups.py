"""Rank arithmetic of the process groups (no processes), ParallelConfig validation, and DeepSpeed's layout."""

from __future__ import annotations

import pytest

from parallel.config import ParallelConfig, resolve_precision
from parallel.expert_parallel import deepspeed_group_name
from parallel.topology import EPPosition, GroupLayout, check_expert_parallel


def test_layout_world8_ep4():
    lay = GroupLayout(8, 4, num_experts=16)
    assert lay.all_ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.all_edp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.edp_size == 2 and deepspeed_group_name(lay.ep_size) == "ep_size_4"
    assert [lay.position(r).rank for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [r // lay.ep_size for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]  # edp rank
    assert lay.ep_group_ranks(6) == [4, 5, 6, 7] and lay.edp_group_ranks(6) == [2, 6]
    assert list(lay.local_experts(0)) == [0, 1, 2, 3] and list(lay.local_experts(7)) == [12, 13, 14, 15]


@pytest.mark.parametrize("world,ep", [(1, 1), (4, 1), (4, 2), (4, 4), (16, 8), (64, 16), (12, 4)])
def test_every_rank_in_exactly_one_group_and_experts_covered(world, ep):
    lay = GroupLayout(world, ep, num_experts=16)
    for groups in (lay.all_ep_groups(), lay.all_edp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(world))
    for g in lay.all_ep_groups():  # each EP group holds every expert exactly once
        assert sorted(e for r in g for e in lay.local_experts(r)) == list(range(16))
    for g in lay.all_edp_groups():  # each EDP group holds one set of experts, replicated
        assert len({tuple(lay.local_experts(r)) for r in g}) == 1
        assert len(g) == lay.edp_size
    for r in range(world):
        assert r in lay.ep_group_ranks(r) and r in lay.edp_group_ranks(r)
        assert set(lay.ep_group_ranks(r)) & set(lay.edp_group_ranks(r)) == {r}


def test_matches_deepspeed_default_topology():
    # deepspeed.utils.groups._create_expert_and_data_parallel, legacy path: EP groups are
    # range(i*ep, (i+1)*ep), expert-data groups range(i, world, ep). Written out from its docstring.
    lay = GroupLayout(16, 2)
    assert lay.all_edp_groups() == [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    assert lay.all_ep_groups()[:3] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize(
    "world,ep,experts,msg",
    [
        (8, 3, 16, "does not divide the world size 8"),
        (8, 16, 16, "does not divide the world size 8"),
        (8, 8, 4, "does not divide num_experts=4"),
        (6, 3, 16, "does not divide num_experts=16"),
        (8, 0, 16, "positive int"),
        (0, 1, 16, "positive int"),
    ],
)
def test_bad_expert_parallel_sizes(world, ep, experts, msg):
    with pytest.raises(ValueError, match=msg):
        check_expert_parallel(world, ep, experts)
    with pytest.raises(ValueError):
        GroupLayout(world, ep, experts)


def test_error_lists_valid_choices():
    with pytest.raises(ValueError, match=r"choose one of \[1, 2, 4\]"):
        check_expert_parallel(8, 8, 4)


def test_parallel_config_validation():
    assert ParallelConfig().expert_parallel_size == 1
    ParallelConfig(expert_parallel_size=8, zero_stage=2, precision="bf16").check(64, 16)
    for bad, field in (
        (dict(zero_stage=4), "parallel.zero_stage"),
        (dict(zero_stage=3), "stage 3 is not supported"),  # the trainer's stages: ZERO_STAGES
        (dict(precision="fp16"), "parallel.precision"),
        (dict(expert_parallel_size=0), "parallel.expert_parallel_size"),
        (dict(activation_checkpointing="some"), "parallel.activation_checkpointing"),
        (dict(router_stats_scope="node"), "parallel.router_stats_scope"),
    ):
        with pytest.raises(ValueError, match=field):
            ParallelConfig(**bad).validate()
    with pytest.raises(ValueError, match="does not divide num_experts"):
        ParallelConfig(expert_parallel_size=32).check(64, 16)
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_ep_position_is_the_layouts():
    lay = GroupLayout(8, 4, num_experts=16)
    for r in range(8):
        pos = lay.position(r)
        assert pos == EPPosition(4, r % 4)
        assert pos.experts(16) == lay.local_experts(r) == range(4 * (r % 4), 4 * (r % 4) + 4)
