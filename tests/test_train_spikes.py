"""Loss spikes injected into real runs (one process, DeepSpeed ZeRO-1): each policy does what it says."""

import math

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import WEIGHTS_FILE, tag_for
from train.testing import TINY, run_train

pytestmark = pytest.mark.distributed
SPIKY = [*TINY, "spikes.min_history=3", "trainer.eval_interval=0"]


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / tag_for(step) / WEIGHTS_FILE))


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(150)
def test_skip_batch_applies_no_update(tmp_path):
    # A NaN loss at step 5 and a 10x loss at step 8; a checkpoint after every step to compare weights.
    run = run_train(
        tmp_path,
        [
            *SPIKY,
            "spikes.policy=skip_batch",
            "trainer.max_steps=9",
            "checkpoint.interval=1",
            "checkpoint.keep_last=10",
            "faults.nan_loss_steps=[5]",
            "faults.loss_spike_steps=[8]",
        ],
    )
    assert run.returncode == 0, run.output[-4000:]
    spikes = {e["step"]: e for e in run.events("spike")}
    assert sorted(spikes) == [5, 8]
    assert spikes[5]["spike/kind"] == "nonfinite_loss" and spikes[5]["spike/loss"] == "nan"
    assert spikes[8]["spike/kind"] == "loss" and spikes[8]["spike/loss"] > spikes[8]["spike/threshold"]
    assert all(e["spike/action"] == "skipped" for e in spikes.values())
    assert spikes[8]["spike/max_layer"] and spikes[8]["spike/max_layer_grad_norm"] > 0
    assert same(weights(tmp_path, 4), weights(tmp_path, 5)) and same(
        weights(tmp_path, 7), weights(tmp_path, 8)
    )
    assert not same(weights(tmp_path, 8), weights(tmp_path, 9))
    losses = run.losses()
    assert all(math.isfinite(losses[s]) for s in (6, 7, 9)) and losses[9] < 2 * losses[7]
    assert [r for r in run.metrics() if "train/loss" in r][-1]["train/skipped_steps"] == 2


@pytest.mark.timeout(150)
def test_rollback_restores_the_checkpoint_and_moves_past_the_data(tmp_path):
    run = run_train(
        tmp_path,
        [
            *SPIKY,
            "spikes.policy=rollback",
            "trainer.max_steps=8",
            "checkpoint.interval=4",
            "faults.loss_spike_steps=[6]",
        ],
    )
    assert run.returncode == 0, run.output[-4000:]
    (spike,) = run.events("spike")
    (rollback,) = run.events("rollback")
    assert spike["step"] == 6 and spike["spike/action"] == "rolled_back"
    assert rollback["step"] == 6 and rollback["rollback/to_step"] == 4
    steps = [r["step"] for r in run.metrics() if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # 5 and 6 again, on the data after the spike
    first, again = [r["train/loss"] for r in run.metrics() if r.get("step") == 5 and "train/loss" in r]
    assert first != again
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(8)
