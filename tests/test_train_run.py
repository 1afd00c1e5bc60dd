"""End to end on CPU with real processes (torchrun, gloo, DeepSpeed ZeRO-2): metrics, W&B offline, evaluation,
a save killed midway, exact resume, and bad input. One reference run is shared by the tests of this module."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from data import DataConfig, TokenLoader
from train.checkpoint import STATE_FILE, WEIGHTS_FILE, find_latest, read_state, safe_load, tag_for
from train.checkpoint_writer import FP32_MASTERS, WEIGHTS_ELSEWHERE
from train.config import Schedule, ScheduleConfig
from train.eval import load_model
from train.optim import lr_multiplier
from train.spikes import ACTION_CODES, KIND_CODES, POLICY_CODES
from train.testing import TINY, read_wandb_events, read_wandb_history, run_train

pytestmark = pytest.mark.distributed
# Two ranks, each holding 2 of the 4 experts of every MoE layer (parallel/expert_parallel.py), ZeRO-2 over
# the dense parameters, gradient accumulation: the state hardest to restore exactly; and a 10x loss spike
# at step 5 under the default policy `log` (its threshold depends on restored state too); attention dropout,
# so that an exact resume needs each rank's RNG state.
TWO_RANKS = [
    *TINY,
    "model.attention_dropout=0.1",
    "faults.loss_spike_steps=[5]",
    "spikes.min_history=3",
    "parallel=zero2",
    "parallel.expert_parallel_size=2",
    "trainer.grad_accum_steps=2",
    "trainer.max_steps=6",
    "checkpoint.interval=2",
    "trainer.eval_interval=3",
    "checkpoint.keep_last=5",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    # WANDB_SILENT off: the trainer's own W&B settings must keep its console quiet
    run = run_train(
        run_dir,
        [*TWO_RANKS, "logging.wandb.mode=offline"],
        nproc=2,
        timeout=150,
        env={"WANDB_SILENT": "false"},
    )
    assert run.returncode == 0, run.output[-4000:]
    return run


@pytest.mark.timeout(200)
def test_metrics_reach_jsonl_and_offline_wandb(reference):
    records = reference.metrics()
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    want = {
        "train/loss",
        "train/lm_loss",
        "train/lr",
        "train/grad_norm",
        "train/aux_loss",
        "train/z_loss",
        "perf/tokens_per_s",
        "perf/mfu",
        "perf/eta_s",
        "mem/peak_rss_gb",
        "moe/aux_loss/layer1",
        "moe/aux_loss/layer3",
        "moe/load/layer1/expert0",
        "moe/load/layer3/expert3",
        "moe/load_max/layer1",
    }
    assert want <= set(steps[-1]), want - set(steps[-1])
    load = [steps[-1][f"moe/load/layer1/expert{e}"] for e in range(4)]
    assert sum(load) == pytest.approx(1.0) and all(0 <= x <= 1 for x in load)
    vals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in vals] == [3, 6] and all(math.isfinite(r["val/loss"]) for r in vals)
    history = read_wandb_history(reference.run_dir)
    wandb_keys = set().union(*history)
    assert want | {"val/loss", "val/ppl", "step"} <= wandb_keys, (want | {"val/loss"}) - wandb_keys
    by_step = {row["step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert by_step == pytest.approx({r["step"]: r["train/loss"] for r in steps})
    assert (reference.run_dir / ".hydra" / "config.yaml").is_file()  # written by rank 0 only
    assert "Error" not in reference.output
    (spike,) = reference.events("spike")  # policy `log`: recorded, and the update applied
    assert spike["step"] == 5 and spike["spike/kind"] == "loss" and spike["spike/action"] == "applied"
    assert spike["spike/loss"] > spike["spike/threshold"] and spike["spike/max_layer_grad_norm"] > 0
    assert "spike/loss" in set().union(*history)
    # the LR of step s (1-based) is the schedule's value at 0-based s - 1: warmup 1/2, 2/2, then cosine
    sched = read_state(reference.run_dir / "checkpoints" / tag_for(6))["config"]["schedule"]
    sched = ScheduleConfig(**{**sched, "name": Schedule(sched["name"])})
    base = read_state(reference.run_dir / "checkpoints" / tag_for(6))["config"]["optim"]["lr"]
    lrs = [r["train/lr"] for r in steps]
    assert lrs == pytest.approx([base * lr_multiplier(s - 1, sched) for s in range(1, 7)], rel=1e-12)
    assert lrs[:2] == pytest.approx([base / 2, base], rel=1e-12) and lrs[-1] < lrs[2]


@pytest.mark.timeout(60)
def test_spike_counters_codes_and_text_reach_offline_wandb(reference):
    # the reference run's one spike (step 5, policy log): cumulative counters every interval, numeric codes
    # in the history row of the event, the text fields in the `spikes/events` table of the offline run
    history = read_wandb_history(reference.run_dir)
    counts = {r["step"]: (r["spikes/count"], r["spikes/skipped"]) for r in history if "train/loss" in r}
    assert counts == {1: (0, 0), 2: (0, 0), 3: (0, 0), 4: (0, 0), 5: (1, 0), 6: (1, 0)}
    (event,) = [r for r in history if "spike/kind_code" in r]
    assert event["step"] == 5 and event["spike/kind_code"] == KIND_CODES["loss"]
    assert (
        event["spike/action_code"] == ACTION_CODES["applied"]
        and event["spike/policy_code"] == POLICY_CODES["log"]
    )
    (row,) = read_wandb_events(reference.run_dir, "spikes/events")
    (spike,) = reference.events("spike")
    assert row["step"] == 5 and (row["kind"], row["action"], row["policy"]) == ("loss", "applied", "log")
    assert row["layer"] == spike["spike/max_layer"] and isinstance(row["layer"], str) and row["layer"]
    assert row["loss"] == pytest.approx(spike["spike/loss"]) and row["loss"] > row["threshold"]


@pytest.mark.timeout(120)
def test_eval_cli_reports_loss_and_perplexity(reference):
    ckpt = reference.run_dir / "checkpoints"
    p = subprocess.run(
        [sys.executable, "-m", "train.eval", str(ckpt), "--batches", "3", "--micro-batch-size", "2"],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["step"] == 6 and out["batches"] == 3 and out["ppl"] == pytest.approx(math.exp(out["loss"]))
    # recomputed here: the first 3 val micro-batches of 2 rows, token-weighted lm_loss of the step-6 weights
    model = load_model(find_latest(ckpt), torch.device("cpu"))
    cfg = read_state(find_latest(ckpt))["config"]["data"]
    loader = TokenLoader(
        DataConfig(path=cfg["path"], seq_len=cfg["seq_len"], micro_batch_size=2), split="val"
    )
    total = n = 0.0
    with torch.no_grad():
        for (x, y), _ in zip(loader, range(3), strict=False):
            k = float((y != -100).sum())
            total, n = total + float(model(x, labels=y).lm_loss) * k, n + k
    assert out["loss"] == pytest.approx(total / n, abs=1e-5) and out["tokens"] == n
    val = [r["val/loss"] for r in reference.metrics() if "val/loss" in r][-1]
    assert abs(out["loss"] - val) < 0.1 * val  # other val batches (ranks read other parts), same model


@pytest.mark.timeout(300)
def test_killed_save_keeps_latest_and_resume_is_exact(reference, tmp_path):
    # The same run, killed (SIGKILL, rank 0 and 1) while writing the step-4 checkpoint ...
    killed = run_train(tmp_path, [*TWO_RANKS, "faults.kill_during_save_step=4"], nproc=2, timeout=150)
    assert killed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == tag_for(2)
    assert (ckpts / tag_for(4)).is_dir() and not (ckpts / tag_for(4) / STATE_FILE).exists()
    assert find_latest(ckpts) == ckpts / tag_for(2)
    # ... and resumed: it continues from step 2 and reproduces the uninterrupted run.
    resumed = run_train(tmp_path, [*TWO_RANKS, "logging.wandb.mode=offline"], nproc=2, timeout=150)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.output and tag_for(2) in resumed.output
    want, got = reference.losses(), resumed.losses()
    for step in range(3, 7):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    (spike,) = [e for e in resumed.events("spike")]  # the detector's statistics were restored too
    assert spike["spike/threshold"] == pytest.approx(
        reference.events("spike")[0]["spike/threshold"], abs=1e-6
    )
    assert (ckpts / "latest").read_text() == tag_for(6) and (ckpts / tag_for(4) / STATE_FILE).is_file()
    # the W&B run continues: the resumed run logs to the id the killed run saved at step 2
    run_id = read_state(ckpts / tag_for(2))["wandb_run_id"]
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    assert offline.name.endswith(f"-{run_id}") and read_state(ckpts / tag_for(6))["wandb_run_id"] == run_id
    # the consolidated file holds every rank's experts (not rank 0's twice)
    key = "model.layers.1.feed_forward.experts.gate_up_proj"
    experts = load_file(str(ckpts / tag_for(6) / WEIGHTS_FILE))[key]
    assert experts.shape[0] == 4 and not torch.equal(experts[:2], experts[2:])
    # every tensor written once: no weights in DeepSpeed's files (no module, no ZeRO fp32 masters)
    assert safe_load(ckpts / tag_for(6) / "mp_rank_00_model_states.pt")["module"] == WEIGHTS_ELSEWHERE
    for optim in (ckpts / tag_for(6)).glob("*optim_states.pt"):
        assert FP32_MASTERS not in safe_load(optim)["optimizer_state_dict"]
    assert not list((ckpts / tag_for(6)).glob("experts_ep*"))


@pytest.mark.timeout(120)
def test_bad_input_fails_clearly_and_loses_nothing(reference, tmp_path):
    ckpt = reference.run_dir / "checkpoints" / tag_for(6)
    before = sorted(p.name for p in ckpt.iterdir())
    other_model = run_train(tmp_path / "a", [*TINY, f"resume={ckpt}", "model.hidden_size=48"], timeout=100)
    assert other_model.returncode == 2, other_model.output[-3000:]
    assert "holds another model" in other_model.output and "hidden_size: 32 -> 48" in other_model.output
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not (tmp_path / "a").exists()  # a failed start writes no .hydra/, train.log, lock or run folder
    no_data = run_train(tmp_path / "b", [*TINY, "data.path=/nonexistent/corpus"], timeout=100)
    assert (
        no_data.returncode == 2
        and "DataError" in no_data.output
        and "python -m data.prepare" in no_data.output
    )


@pytest.mark.timeout(150)
def test_weights_only_resume_on_another_layout(reference, tmp_path):
    # 2 ranks with 2 experts each -> 2 ranks with all 4 (EP=1), weights only (fresh moments): the first step's
    # loss is computed before any update, so it is the reference's (same data, same RNG: same world size).
    ckpt = reference.run_dir / "checkpoints" / tag_for(2)
    args = [
        *TWO_RANKS,
        "parallel.expert_parallel_size=1",
        f"resume={ckpt}",
        "trainer.max_steps=3",
        "checkpoint.load_optimizer_states=false",
    ]
    weights_only = run_train(tmp_path, args, nproc=2, timeout=120)
    assert weights_only.returncode == 0, weights_only.output[-4000:]
    got, want = weights_only.losses(), reference.losses()
    assert list(got) == [3] and abs(got[3] - want[3]) <= 1e-5, (got, want[3])


@pytest.mark.timeout(200)
def test_console_shows_the_model_and_a_summary_without_noise(reference):
    out = reference.output
    assert "model debug (MME*ME): " in out and ", 2 ranks," in out
    assert "layout MME*ME (4 layers: 3 mamba, 1 attention" in out and "  mixer M M * M" in out
    assert re.search(
        r"step 3 \| val loss [0-9.]+ \| val ppl [0-9.]+ \| .*2 batches x 2 ranks, [0-9,]+ tokens", out
    )
    assert "run test finished at step 6/6" in out and "wandb sync " in out and "val loss " in out
    assert out.count("spike at step 5") == 1  # warnings once, from rank 0
    for noise in ("untested optimizer", "wandb:", "1 ranks"):
        assert noise not in out, noise
    config = (reference.run_dir / "config.yaml").read_text()
    assert "layer_pattern: MME*ME" in config and "hidden_size: 32" in config and "${" not in config
    assert (reference.run_dir / "layout.txt").read_text().startswith("layout MME*ME (4 layers")
