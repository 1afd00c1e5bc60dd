"""Checkpoints written in the background: killed at any moment of a save, `latest` stays on the previous
complete checkpoint and a resume continues exactly; every save logs its stall, write time and bytes."""

import pytest
from safetensors import safe_open

from train.checkpoint import STATE_FILE, WEIGHTS_FILE, find_latest, read_state, safe_load, tag_for
from train.checkpoint_writer import WEIGHTS_ELSEWHERE
from train.testing import TINY, run_train

pytestmark = pytest.mark.distributed
ONE_RANK = [
    *TINY,
    "trainer.max_steps=5",
    "checkpoint.interval=2",
    "trainer.eval_interval=0",
    "parallel=zero2",
]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("phase", ["write", "written", "state"])
def test_a_save_killed_in_the_background_leaves_latest_on_the_previous(tmp_path, phase):
    killed = run_train(
        tmp_path, [*ONE_RANK, "faults.kill_during_save_step=4", f"faults.kill_during_save_phase={phase}"]
    )
    assert killed.returncode != 0 and "killing this process" in killed.output, killed.output[-3000:]
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == tag_for(2)
    assert find_latest(ckpts) == ckpts / tag_for(2)
    assert (ckpts / tag_for(4) / STATE_FILE).is_file() == (phase == "state")
    if phase != "state":
        return
    resumed = run_train(tmp_path, ONE_RANK)  # the step-4 directory is complete but not `latest`
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output and tag_for(2) in resumed.output
    # the reference with trainer.deterministic on: on CPU it changes no result (the same losses as the resumed
    # run without it), and the run says which kernels it took
    reference = run_train(tmp_path / "ref", [*ONE_RANK, "trainer.deterministic=true"])
    assert (
        "kernels: selective scan torch, causal conv torch, experts loop (on cpu), deterministic algorithms on"
        in (reference.output)
    )
    want, got = reference.losses(), resumed.losses()
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in (3, 4, 5)), (got, want)
    saves = [r for r in resumed.metrics() if "checkpoint/stall_s" in r]
    assert [r["checkpoint/step"] for r in saves] == [2, 5]  # killed run: 2 committed; resumed: 4 exists
    assert saves[0]["checkpoint/bytes"] > 0 and saves[0]["checkpoint/write_s"] > 0
    ckpt = ckpts / tag_for(5)
    assert read_state(ckpt)["step"] == 5 and (ckpts / "latest").read_text() == tag_for(5)
    # every tensor once: the weights only in model_state.safetensors, no fp32 master copy in ZeRO's file
    module = safe_load(ckpt / "mp_rank_00_model_states.pt")
    assert module["module"] == WEIGHTS_ELSEWHERE
    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        assert "model.embed_tokens.weight" in f.keys()


def _pinned_ahead_run(run_dir: str) -> None:
    """In a 1-rank gloo world: the trainer in-process, one step; then the plan of a save, buffers
    allocated from it as on a GPU (pinning recorded instead of done: no CUDA here), and a real save."""
    import ctypes
    import math
    import os

    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from train.build import consolidated_state_dict
    from train.checkpoint_writer import PAGE
    from train.config import register, to_config
    from train.distributed import Dist
    from train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    register()
    with initialize_config_dir(os.path.join(root, "conf"), version_base=None):
        cfg = to_config(compose("config", overrides=[*ONE_RANK, f"run_dir={run_dir}", "run_name=test"]))
    trainer = Trainer(cfg, Dist(0, 1, 0, torch.device("cpu")))
    try:
        trainer.train_step()
        ck, engine = trainer.checkpointer, trainer.engine
        weights = consolidated_state_dict(engine.module, cfg)
        plan = ck.plan(engine, weights)
        assert not (ck.root / ".plan").exists()
        keys = [k for k, _, _ in plan]
        assert len(set(keys)) == len(keys) and any("exp_avg_sq" in map(str, k) for k in keys), keys
        assert sum(k[0] == "weights" for k in keys) == len(weights)
        host, pinned, unpinned = ck.snapshot.host, [], []

        def fail_at_the_fourth(ptr, size):  # pinning that fails midway: what was pinned is given back
            if len(pinned) == 3:
                raise RuntimeError("cudaError 2")
            pinned.append((ptr, size))

        host.pin, host.pin_fn, host.unpin_fn = True, fail_at_the_fourth, unpinned.append
        host.prepare(plan)
        host.ready()
        assert "cudaError 2" in str(host.prepare_error) and not host.buffers and host.arena is None
        assert unpinned == [p for p, _ in pinned] and len(pinned) == 3
        pinned, host.prepare_error = [], None
        host.pin_fn = lambda ptr, size: pinned.append((ptr, size))
        host.done = lambda: None  # no device copies to wait for on the CPU
        host.prepare(plan)
        host.ready()
        assert host.prepare_error is None and set(host.buffers) == set(keys)
        state_bytes = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        arena = ctypes.addressof(ctypes.c_char.from_buffer(host.arena))
        assert state_bytes <= len(host.arena) <= state_bytes + PAGE * len(plan)  # one copy of it
        pinned.sort()
        assert all(p % PAGE == 0 and s % PAGE == 0 for p, s in pinned)  # each buffer on its own pages
        assert all(a + s <= b for (a, s), (b, _) in zip(pinned, pinned[1:], strict=False))
        assert arena <= pinned[0][0] and pinned[-1][0] + pinned[-1][1] <= arena + len(host.arena)
        ptrs = {k: b.data_ptr() for k, b in host.buffers.items()}
        # every tensor of the save goes into its planned buffer: one not foreseen would be allocated with
        # pin_memory=True, which fails without CUDA
        ck.save(engine, 1, trainer._state(), weights)
        assert {k: b.data_ptr() for k, b in host.buffers.items()} == ptrs
        saved = load_file(str(ck.root / tag_for(1) / WEIGHTS_FILE))
        assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)
        saved = safe_load(ck.root / tag_for(1) / "mp_rank_00_model_states.pt")["optimizer"]["state"]
        live = trainer.optimizer.state_dict()["state"]
        assert saved.keys() == live.keys() and all(
            torch.equal(saved[i][m], live[i][m]) for i in live for m in ("exp_avg", "exp_avg_sq")
        )
    finally:
        trainer.close()


@pytest.mark.timeout(120)
def test_host_buffers_pinned_ahead_hold_the_first_save(tmp_path):
    from dist_utils import run_distributed

    run_distributed(_pinned_ahead_run, 1, str(tmp_path), timeout=100)
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(1)
