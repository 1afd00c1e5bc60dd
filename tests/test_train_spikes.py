"""Loss spikes injected into real runs (one process, and two ranks under ZeRO-2): each policy does what it
says, checked on the saved weights; rollback against a recomputation from the restored checkpoint."""

import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY
from train_runs import Run, run_train

from data import DataConfig, TokenLoader
from train.checkpoint_layout import WEIGHTS_FILE, read_state, tag_for
from train.eval import load_model

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
    assert [r for r in run.metrics() if "train/loss" in r][-1]["spikes/skipped"] == 2


@pytest.mark.timeout(150)
def test_rollback_restores_the_checkpoint_and_moves_past_the_data(tmp_path):
    run = run_train(
        tmp_path,
        [
            *SPIKY,
            "spikes.policy=rollback",
            "spikes.max_rollbacks=1",  # exactly one rollback is allowed
            "trainer.max_steps=8",
            "checkpoint.interval=4",
            "checkpoint.keep_last=10",
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
    # step 5 again = the step-4 weights on the 7th batch of the stream (steps 1-6 took the first six)
    ckpt = tmp_path / "checkpoints" / tag_for(4)
    assert again == pytest.approx(loss_of(ckpt, batch_index=6), abs=1e-5)
    assert first == pytest.approx(loss_of(ckpt, batch_index=4), abs=1e-5)


def loss_of(ckpt, batch_index: int) -> float:
    """The training loss (with the router terms) of a checkpoint's weights on one batch of its train stream."""
    model = load_model(ckpt, torch.device("cpu")).train()
    loader = TokenLoader(DataConfig(**read_state(ckpt)["config"]["data"]), split="train")
    for i, (x, y) in enumerate(loader):
        if i == batch_index:
            with torch.no_grad():
                return float(model(x, labels=y).loss)
    raise AssertionError("unreachable")


@pytest.mark.timeout(150)
def test_too_many_rollbacks_stop_the_run(tmp_path):
    # spikes at steps 3 and 4 (4 on its first attempt, after the rollback to 2): the second rollback is one
    # more than spikes.max_rollbacks=1 allows
    run = run_train(
        tmp_path,
        [
            *SPIKY,
            "spikes.min_history=2",
            "spikes.policy=rollback",
            "spikes.max_rollbacks=1",
            "trainer.max_steps=6",
            "checkpoint.interval=2",
            "faults.loss_spike_steps=[3,4]",
        ],
    )
    assert run.returncode != 0
    assert "2 rollbacks (spikes.max_rollbacks=1)" in run.output, run.output[-3000:]
    assert [e["step"] for e in run.events("rollback")] == [3]
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(2)


@pytest.mark.timeout(150)
def test_skip_batch_under_zero2_on_two_ranks(tmp_path):
    # ZeRO-2 steps the optimizer on each rank's partition: a skipped step must leave every partition alone
    run = run_train(
        tmp_path,
        [
            *SPIKY,
            "spikes.min_history=2",
            "spikes.policy=skip_batch",
            "parallel=zero2",
            "parallel.expert_parallel_size=2",
            "trainer.max_steps=5",
            "checkpoint.interval=1",
            "checkpoint.keep_last=10",
            "faults.nan_loss_steps=[3]",
            "faults.loss_spike_steps=[4]",
        ],
        nproc=2,
        timeout=140,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "ZeRO-2" in run.output
    spikes = {e["step"]: e for e in run.events("spike")}
    assert sorted(spikes) == [3, 4] and all(e["spike/action"] == "skipped" for e in spikes.values())
    assert spikes[4]["spike/kind"] == "loss"
    assert not same(weights(tmp_path, 1), weights(tmp_path, 2))
    assert same(weights(tmp_path, 2), weights(tmp_path, 3)) and same(
        weights(tmp_path, 3), weights(tmp_path, 4)
    )
    assert not same(weights(tmp_path, 4), weights(tmp_path, 5))


def _nonfinite_grad_run(run_dir: str) -> None:
    """In a 1-rank gloo world: the trainer in-process, with a gradient hook that makes step 3's gradients
    infinite while its loss stays finite."""
    import os

    from hydra import compose, initialize_config_dir

    from train.config import register, to_config
    from train.distributed import Dist
    from train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    register()
    overrides = [
        *SPIKY,
        f"run_dir={run_dir}",
        "run_name=test",
        "trainer.max_steps=4",
        "checkpoint.interval=1",
        "checkpoint.keep_last=10",
    ]
    with initialize_config_dir(os.path.join(root, "conf"), version_base=None):
        cfg = to_config(compose("config", overrides=overrides))
    trainer = Trainer(cfg, Dist(0, 1, 0, torch.device("cpu")))
    p = trainer.engine.module.model.embed_tokens.weight
    p.register_hook(lambda g: g + float("inf") if trainer.step == 2 else g)
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.mark.timeout(120)
def test_nonfinite_gradients_skip_the_update(tmp_path):
    from dist_utils import run_distributed

    run_distributed(_nonfinite_grad_run, 1, str(tmp_path), timeout=100)
    run = Run(0, "", tmp_path)
    (spike,) = run.events("spike")
    assert spike["step"] == 3 and spike["spike/kind"] == "nonfinite_grad"
    assert spike["spike/action"] == "skipped" and spike["spike/grad_norm"] == "inf"
    assert same(weights(tmp_path, 2), weights(tmp_path, 3)) and not same(
        weights(tmp_path, 3), weights(tmp_path, 4)
    )
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert [r for r in run.metrics() if "train/loss" in r][-1]["spikes/skipped"] == 1
