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
    reference = run_train(tmp_path / "ref", ONE_RANK)
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
