"""The ablation sweep: layouts, the plan, and a real tiny sweep that is interrupted, resumed, skipped and
reported (table, plot, probe; from JSONL and from the offline W&B files)."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import TINY

from jamba import pattern_from_periods
from launch import report, sweep
from launch.commands import LaunchError
from train.checkpoint_layout import STATE_FILE, STATE_VERSION

# TINY without the keys the sweep sets itself (the layout and the experts).
EXTRA = [o for o in TINY if o.split("=")[0] not in sweep.OWNED and not o.startswith("logging.wandb")]
EXTRA += ["checkpoint.interval=2", "trainer.eval_interval=2"]


def test_layer_patterns_over_the_debug_depth():
    assert sweep.layer_pattern(8, "attn", False) == "********"
    assert sweep.layer_pattern(8, "mamba", False) == "MMMMMMMM"
    assert sweep.layer_pattern(8, "1:3", False) == "MM*MMM*M"
    assert sweep.layer_pattern(8, "1:7", True) == "MMEMME*MEMME"
    assert sweep.layer_pattern(8, "1:7", True) == pattern_from_periods(
        8, 8, 4, 2, 1
    )  # the paper's Jamba block
    assert sweep.layer_pattern(4, "attn", True) == "**E**E"
    with pytest.raises(LaunchError, match="needs at least 10 layers"):
        sweep.layer_pattern(8, "1:9", False)
    with pytest.raises(LaunchError, match="use attn, mamba or 1:k"):
        sweep.layer_pattern(8, "2:3", False)


def test_mixer_axis_swaps_only_the_recurrent_symbol():
    m1, m2 = sweep.layer_pattern(8, "1:7", True), sweep.layer_pattern(8, "1:7", True, "mamba2")
    assert m2 == "SSESSE*SESSE" and m2.replace("S", "M") == m1  # same depth, attention and MoE positions
    assert sweep.layer_pattern(4, "mamba", False, "mamba2") == "SSSS"
    assert sweep.layer_pattern(4, "attn", False, "mamba2") == "****"
    with pytest.raises(LaunchError, match="mixer 'attention': choose from mamba, mamba2"):
        sweep.layer_pattern(8, "1:7", False, "attention")


def test_plan_is_the_same_run_but_for_the_layout(tmp_path, capsys):
    assert (
        sweep.main(
            [
                "--name",
                "p",
                "--root",
                str(tmp_path),
                "--dry-run",
                "--ratios",
                "attn,1:7",
                "--axis",
                "model.use_rope=false,true",
            ]
        )
        == 0
    )
    assert "8 runs" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "sweep-p" / "sweep.json").read_text())
    names = [v["name"] for v in manifest["variants"]]
    assert names[:4] == [
        "attn-moe-use_rope-false",
        "attn-moe-use_rope-true",
        "attn-dense-use_rope-false",
        "attn-dense-use_rope-true",
    ]
    varying = {
        "model.layer_pattern",
        "model.num_experts",
        "model.use_rope",
        "run_name",
        "run_dir",
        "logging.wandb.tags",
    }
    shared = [{o for o in v["overrides"] if o.split("=")[0] not in varying} for v in manifest["variants"]]
    assert all(s == shared[0] for s in shared)  # same preset, steps, seeds, data, group
    assert {"model=debug", "+experiment=ablation-debug", "logging.wandb.group=p", "resume=auto"} <= shared[0]
    dense = manifest["variants"][2]["overrides"]
    assert "model.num_experts=1" in dense and "model.layer_pattern=********" in dense
    assert f"run_dir={tmp_path}/sweep-p/attn-dense-use_rope-false" in dense


def test_plan_rejects_overrides_the_sweep_owns_and_typos(tmp_path, capsys):
    assert sweep.main(["--root", str(tmp_path), "--dry-run", "--", "run_dir=x"]) == 2
    assert "the sweep sets run_dir" in capsys.readouterr().err
    assert sweep.main(["--root", str(tmp_path), "--dry-run", "--", "trainer.max_stepz=3"]) == 2
    assert "max_stepz" in capsys.readouterr().err


def test_run_status(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert sweep.run_status(ckpts, 10) == ("new", 0)
    (ckpts / "step_00000004").mkdir(parents=True)
    (ckpts / "step_00000004" / STATE_FILE).write_text(json.dumps({"version": STATE_VERSION, "step": 4}))
    (ckpts / "step_00000010").mkdir()  # a save that was killed: no trainer_state.json
    assert sweep.run_status(ckpts, 10) == ("partial", 4)
    assert sweep.run_status(ckpts, 4) == ("done", 4)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """attn dies at step 3 (after its step-2 checkpoint); the rerun resumes it and starts 1:3; a third
    invocation starts nothing."""
    root = tmp_path_factory.mktemp("sweeps")
    args = ["--name", "t", "--root", str(root), "--steps", "4", "--moe", "off", "--timeout", "150"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # on a shared 2-core machine, more threads per process only contend
        mp.setenv("WANDB_SILENT", "true")
        rc1 = sweep.main([*args, "--ratios", "attn", "--", *EXTRA, "faults.die_at_step=3"])
        status1 = sweep.run_status(root / "sweep-t" / "attn-dense" / "checkpoints", 4)
        rc2 = sweep.main([*args, "--ratios", "attn,1:3", "--", *EXTRA])
        log = root / "sweep-t" / "attn-dense" / "console.log"
        size = log.stat().st_size
        rc3 = sweep.main([*args, "--ratios", "attn,1:3", "--", *EXTRA])
    return {
        "root": root / "sweep-t",
        "rc": (rc1, rc2, rc3),
        "status1": status1,
        "log_grew": log.stat().st_size - size,
    }


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_sweep_interrupt_resume_skip(tiny_sweep):
    assert tiny_sweep["rc"] == (1, 0, 0)
    assert tiny_sweep["status1"] == ("partial", 2)
    attn = tiny_sweep["root"] / "attn-dense"
    assert "resumed from" in (attn / "console.log").read_text()
    assert tiny_sweep["log_grew"] == 0  # the third invocation started no run
    for name in ("attn-dense", "1to3-dense"):
        train, _ = report.curves(report.read_records(tiny_sweep["root"] / name))
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        assert train[-1]["train/tokens"] == 4 * 2 * 32
    overrides = (attn / ".hydra" / "overrides.yaml").read_text()
    assert "model.layer_pattern=****" in overrides and "logging.wandb.group=t" in overrides


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_report_table_plot_probe(tiny_sweep, tmp_path):
    md, png = tmp_path / "report.md", tmp_path / "loss.png"
    assert (
        report.main(
            [str(tiny_sweep["root"]), "-o", str(md), "--plot", str(png), "--pairs", "2,4", "--prompts", "10"]
        )
        == 0
    )
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| variant | layout | params total / active | steps | tokens |")
    attn = next(line for line in lines if line.startswith("| attn-dense |"))
    assert "`****`" in attn and "| 4 | 256 |" in attn
    assert any(line.startswith("| 1to3-dense | `MM*M` |") for line in lines)
    assert "random chance 0.10" in md.read_text()
    assert 0 < png.stat().st_size < 200_000
    probe = json.loads((tiny_sweep["root"] / "attn-dense" / "probe.json").read_text())["result"]
    assert probe["step"] == 4 and 0 <= probe["K=2"]["acc"] <= 1


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_report_reads_offline_wandb_like_jsonl(tiny_sweep, tmp_path):
    """Without metrics.jsonl the report reads the offline W&B files, every session of a resumed run."""
    for name in ("1to3-dense", "attn-dense"):
        src, copy = tiny_sweep["root"] / name, tmp_path / name
        shutil.copytree(src / "wandb", copy / "wandb", symlinks=True)
        from_jsonl = report.curves(report.read_records(src))
        from_wandb = report.curves(report.read_records(copy))
        if name == "attn-dense":  # killed at step 3 (os._exit): W&B lost that session's buffer, JSONL did not
            assert len(list(copy.glob("wandb/offline-run-*"))) == 2
            from_jsonl = tuple([r for r in recs if r["step"] >= 3] for recs in from_jsonl)
        for a, b in zip(from_jsonl, from_wandb, strict=True):
            assert [r["step"] for r in a] == [r["step"] for r in b]
            for key in ("train/loss", "val/loss"):
                assert [r.get(key) for r in a] == pytest.approx([r.get(key) for r in b])


def test_report_curves_last_record_wins():
    records = [
        {"step": 1, "train/loss": 5.0},
        {"step": 2, "train/loss": 4.0},
        {"step": 2, "val/loss": 4.5},
        {"event": "spike", "step": 2, "train/loss": 99.0},
        {"step": 2, "train/loss": 3.5},
        {"step": 3, "train/loss": 3.0},
    ]  # step 2 again after a resume
    train, val = report.curves(records)
    assert [(r["step"], r["train/loss"]) for r in train] == [(1, 5.0), (2, 3.5), (3, 3.0)]
    assert [r["val/loss"] for r in val] == [4.5]
    res = report.RunResult("x", Path("."), train=train)
    assert res.train_loss(tail=0.5) == pytest.approx((3.5 + 3.0) / 2)
