"""Checkpoints under expert parallelism (issue 5 part 4; tests 5d, 5e), through train.checkpoint.Checkpointer
and DeepSpeed ZeRO-2 on gloo/CPU, fp32, with a tiny model:

  (d) 4 ranks, EP=2: save at step 2, reload into a fresh engine (each rank reads its own experts from
      model_state.safetensors, sliced), the next steps equal the uninterrupted run's to 1e-6;
  (e) the same checkpoint on 2 ranks (EP=2, gradient accumulation 2: the same global batch and the same
      router-statistics groups) continues with the same losses to 1e-5 through the portable optimizer state,
      and so does it on 2 ranks with EP=1 (statistics over the world: the same token groups); a checkpoint
      without a portable state fails with a clear message there, and a weights-only load gives the same next loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from test_parallel_ep import batch, tiny_cfg

from jamba import JambaForCausalLM
from parallel.expert_parallel import apply_expert_parallel, gather_full_state_dict
from parallel.topology import make_topology
from parallel.zero import optimizer_param_groups

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402 - a hard dependency: a broken install fails here

pytestmark = pytest.mark.distributed
EP, SAVE_AT, MORE, LR = 2, 2, 3, 1e-2


def build(ep: int, gas: int, seed: int, stats_scope: str = "ep"):
    from parallel.deepspeed_moe import prepare_deepspeed_moe

    cfg = tiny_cfg()
    groups = make_topology(ep)
    model = JambaForCausalLM(cfg, seed=seed)
    apply_expert_parallel(model, groups, stats_scope)
    prepare_deepspeed_moe(model, groups)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, groups


def step(engine, s: int, gas: int) -> float:
    """One optimizer step over the global batch of 4 ranks' micro-batches: with world W and gas G = 4 / W,
    rank r takes in micro-step m the batch of "old" rank m * W + r (so EP groups see the same tokens)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    total = torch.zeros(())
    for m in range(gas):
        x, y = batch(m * world + rank + 100 * s)
        loss = engine(x, labels=y).loss
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    dist.all_reduce(total)
    return total.item() / (world * gas)


def checkpointer(root: Path, portable: bool, topo):
    from train.checkpoint import Checkpointer
    from train.config import CheckpointConfig

    return Checkpointer(CheckpointConfig(dir=str(root), portable=portable), topo)


def state(step_: int, ep: int) -> dict:
    return {
        "step": step_,
        "world_size": dist.get_world_size(),
        "model_config": {},
        "config": {"parallel": {"expert_parallel_size": ep}},
    }


def run_four(tmp: str) -> None:
    tmp = Path(tmp)
    engine, groups = build(EP, 1, seed=0)
    for s in range(1, SAVE_AT + 1):
        step(engine, s, 1)
    ck = checkpointer(tmp / "portable", True, groups)
    w = gather_full_state_dict(engine.module, groups)
    path = ck.save(engine, SAVE_AT, state(SAVE_AT, EP), w if dist.get_rank() == 0 else None)
    want = [step(engine, s, 1) for s in range(SAVE_AT + 1, SAVE_AT + MORE + 1)]
    # a checkpoint without portable state, for the 2-rank test's error path
    w = gather_full_state_dict(engine.module, groups)
    checkpointer(tmp / "plain", False, groups).save(
        engine, SAVE_AT + MORE, state(SAVE_AT + MORE, EP), w if dist.get_rank() == 0 else None
    )
    # the loss of the step after it (computed before its update: a function of the weights and the batch)
    after_plain = step(engine, SAVE_AT + MORE + 1, 1)
    if dist.get_rank() == 0:
        (tmp / "want.json").write_text(json.dumps({"want": want, "after_plain": after_plain}))
        from safetensors import safe_open

        # every tensor written once: all 4 experts in the consolidated file, no per-EP-position copies
        f = safe_open(str(path / "model_state.safetensors"), framework="pt")
        assert f.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj").shape[0] == 4
        assert not any(path.glob("experts_ep*"))
    # (d) a fresh engine (other init) resumes on the same layout: identical continuation
    engine2, _ = build(EP, 1, seed=1)
    ck.load(engine2, path)
    got = [step(engine2, s, 1) for s in range(SAVE_AT + 1, SAVE_AT + MORE + 1)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-6, (got, want)


def run_two(tmp: str) -> None:
    from train.checkpoint_layout import CheckpointError

    tmp = Path(tmp)
    saved = json.loads((tmp / "want.json").read_text())
    want = saved["want"]
    engine, topo = build(EP, 2, seed=1)
    plain = tmp / "plain" / f"step_{SAVE_AT + MORE:08d}"
    with pytest.raises(CheckpointError, match="without a portable optimizer state"):
        checkpointer(tmp / "plain", False, topo).load(engine, plain)
    # (e) 4 ranks -> 2 ranks with the optimizer states, from the portable state
    ck = checkpointer(tmp / "portable", True, topo)
    ck.load(engine, tmp / "portable" / f"step_{SAVE_AT:08d}")
    got = [step(engine, s, 2) for s in range(SAVE_AT + 1, SAVE_AT + MORE + 1)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5, (got, want)
    # ... and on 2 ranks without expert parallelism (every rank all 4 experts, read from both EP files);
    # router statistics over the world = over the same tokens as the EP groups of 2 before
    engine3, topo3 = build(1, 2, seed=3, stats_scope="world")
    checkpointer(tmp / "portable", True, topo3).load(engine3, tmp / "portable" / f"step_{SAVE_AT:08d}")
    got = [step(engine3, s, 2) for s in range(SAVE_AT + 1, SAVE_AT + MORE + 1)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5, (got, want)
    # weights only (fresh moments) from a checkpoint without portable state, each rank slicing its experts
    # out of the consolidated file: the next loss is the 4-rank run's
    engine2, topo2 = build(EP, 2, seed=2)
    checkpointer(tmp / "plain", False, topo2).load(engine2, plain, optimizer=False)
    got = step(engine2, SAVE_AT + MORE + 1, 2)
    assert abs(got - saved["after_plain"]) <= 1e-5, (got, saved["after_plain"])


@pytest.mark.timeout(240)
def test_ep_checkpoint_four_ranks_then_two(tmp_path):
    run_distributed(run_four, 4, str(tmp_path), timeout=200)
    run_distributed(run_two, 2, str(tmp_path), timeout=120)


def test_layout_change_needs_a_portable_state(tmp_path):
    from train.checkpoint_layout import CheckpointError
    from train.resume import check_compatible

    st = {"param_shapes": {"w": [4]}, "world_size": 4, "config": {"parallel": {"expert_parallel_size": 2}}}
    new = {"parallel": {"expert_parallel_size": 2}, "checkpoint": {"load_optimizer_states": True}}
    with pytest.raises(
        CheckpointError, match="written by 4 ranks.*no portable state.*checkpoint.portable=true"
    ):
        check_compatible(tmp_path, st, {"w": [4]}, {}, new, 8, world_size=2)
    (tmp_path / "portable").mkdir()
    (tmp_path / "portable" / "dense.safetensors").write_bytes(b"")
    check_compatible(tmp_path, st, {"w": [4]}, {}, new, 8, world_size=2)  # the optimizer states can move


@pytest.mark.timeout(300)
def test_train_resumes_on_one_rank_with_optimizer_states(tmp_path):
    # `python -m train` end to end: 2 ranks, EP=2, portable checkpoints -> 1 rank, EP=1, gradient accumulation 2
    # (the same global batch), optimizer states kept: the 2-rank losses go on (to 1e-5; the router statistics
    # are now per micro-batch instead of per EP group, a ~1e-6 difference here).
    from tiny import TINY
    from train_runs import run_train

    base = [
        *TINY,
        "parallel=zero2",
        "parallel.expert_parallel_size=2",
        "checkpoint.interval=2",
        "checkpoint.portable=true",
        "trainer.max_steps=4",
    ]
    ref = run_train(tmp_path / "ref", base, nproc=2, timeout=140)
    assert ref.returncode == 0, ref.output[-4000:]
    ckpt = tmp_path / "ref" / "checkpoints" / "step_00000002"
    assert (ckpt / "portable" / "experts_ep1.safetensors").is_file()
    one = run_train(
        tmp_path / "one",
        [*base, "parallel.expert_parallel_size=1", "trainer.grad_accum_steps=2", f"resume={ckpt}"],
        nproc=1,
        timeout=140,
    )
    assert one.returncode == 0, one.output[-4000:]
    assert "portable state" in one.output
    want, got = ref.losses(), one.losses()
    assert sorted(got) == [3, 4] and all(abs(got[s] - want[s]) <= 1e-5 for s in got), (got, want)


@pytest.mark.timeout(300)
def test_single_rank_stage0_resumes_exactly_and_on_two_ranks(tmp_path):
    # One rank runs a plain DeepSpeed engine (stage 0: no second fp32 copy) and clips itself. Its checkpoints
    # resume exactly on one rank (DeepSpeed's files) and, through the portable state, on two ranks with ZeRO-1.
    from tiny import TINY
    from train_runs import run_train

    base = [
        *TINY,
        "checkpoint.interval=2",
        "checkpoint.portable=true",
        "trainer.max_steps=4",
        "optim.grad_clip=0.05",
    ]
    ref = run_train(tmp_path / "ref", [*base, "trainer.grad_accum_steps=2"], nproc=1, timeout=140)
    assert ref.returncode == 0, ref.output[-4000:]
    assert "ZeRO-0" in ref.output
    want = ref.losses()
    assert all(math.isfinite(want[s]) for s in want) and len(want) == 4
    norms = [r["train/grad_norm"] for r in ref.metrics() if "train/grad_norm" in r]
    assert len(norms) == 4 and min(norms) > 0.05  # clipping is active: the comparison below tests it
    ckpt = tmp_path / "ref" / "checkpoints" / "step_00000002"
    same = run_train(
        tmp_path / "same", [*base, "trainer.grad_accum_steps=2", f"resume={ckpt}"], nproc=1, timeout=140
    )
    assert same.returncode == 0, same.output[-4000:]
    assert same.losses() == {3: want[3], 4: want[4]}
    two = run_train(tmp_path / "two", [*base, f"resume={ckpt}"], nproc=2, timeout=140)
    assert two.returncode == 0, two.output[-4000:]
    assert "portable state" in two.output
    got = two.losses()
    assert sorted(got) == [3, 4] and all(abs(got[s] - want[s]) <= 1e-5 for s in got), (got, want)
