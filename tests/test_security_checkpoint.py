"""Issue 17, checkpoints: nothing a checkpoint holds is run, or used as a path outside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_data_common import make_prepared
from tiny import tiny_config

from jamba import JambaForCausalLM
from jamba.hf_compat import to_hf_state_dict
from launch.probe import ProbeConfig, probe_checkpoint
from launch.report import main as report_main
from train.checkpoint_layout import (
    MODEL_CONFIG_FILE,
    STATE_FILE,
    STATE_VERSION,
    WEIGHTS_FILE,
    find_latest,
    resolve,
)
from train.eval import main as eval_main
from train.export import main as export_main

pytestmark = pytest.mark.timeout(60)
PROBE = ["--pairs", "2", "--prompts", "4"]


def write_checkpoint(d: Path, data_path: str) -> Path:
    """A complete checkpoint of a tiny byte-vocabulary model whose recorded data.path is `data_path`."""
    from safetensors.torch import save_file

    cfg = tiny_config(vocab_size=259)
    d.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in to_hf_state_dict(JambaForCausalLM(cfg, seed=0)).items()},
        str(d / WEIGHTS_FILE),
    )
    (d / MODEL_CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    state = {"version": STATE_VERSION, "step": 1, "config": {"data": {"path": data_path, "seq_len": 16}}}
    (d / STATE_FILE).write_text(json.dumps(state))
    return d


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(run directory whose checkpoint's data.path is a shell command, the marker that command makes)."""
    marker = tmp_path / "PWNED"
    run = tmp_path / "sweep" / "run1"
    write_checkpoint(run / "checkpoints" / "step_00000001", f"pipe:touch {marker}; false #")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
    return run, marker


def test_eval_never_runs_the_checkpoints_data_command(evil, caplog):
    run, marker = evil
    with caplog.at_level(logging.ERROR):
        assert eval_main([str(run / "checkpoints"), "--device", "cpu"]) == 2
    assert "is not a local directory; a URL or pipe: command from a checkpoint is never used" in caplog.text
    assert not marker.exists()


def test_eval_takes_a_corpus_from_its_own_argument(evil, tmp_path, capsys):
    run, marker = evil
    corpus = make_prepared(tmp_path / "c", n_docs=24)
    args = [
        str(run / "checkpoints"),
        "--data",
        corpus,
        "--micro-batch-size",
        "1",
        "--batches",
        "1",
        "--device",
        "cpu",
    ]
    assert eval_main(args) == 0
    assert json.loads(capsys.readouterr().out)["data"] == corpus and not marker.exists()


def test_probe_and_report_never_run_the_checkpoints_data_command(evil):
    run, marker = evil
    out = probe_checkpoint(run / "checkpoints", ProbeConfig(num_pairs=(2,), num_prompts=4))
    assert out["step"] == 1 and 0 <= out["K=2"]["acc"] <= 1
    assert report_main([str(run.parent), *PROBE]) == 0
    assert (run / "probe.json").is_file() and not marker.exists()


def test_report_refuses_a_sweep_manifest_naming_paths_outside(evil, tmp_path, capsys):
    run, _ = evil
    outside = tmp_path / "outside"
    write_checkpoint(outside / "checkpoints" / "step_00000001", "data_cache/none")
    variants = [{"name": "../outside"}]
    (run.parent / "sweep.json").write_text(json.dumps({"variants": variants}))
    assert report_main([str(run.parent), *PROBE]) == 2
    assert "variant name '../outside' is not a plain directory name" in capsys.readouterr().err
    assert not (outside / "probe.json").exists()


def test_latest_naming_a_path_outside_is_not_followed(tmp_path, caplog):
    root, other = tmp_path / "run" / "checkpoints", tmp_path / "other"
    own = write_checkpoint(root / "step_00000001", "data_cache/none")
    write_checkpoint(other / "step_00000002", "data_cache/none")
    (root / "latest").write_text("../../other/step_00000002")
    with caplog.at_level(logging.WARNING):
        assert find_latest(root) == own == resolve(root)  # resume and eval: the newest complete one inside
    assert "not a complete step_N checkpoint in it" in caplog.text


def test_export_refuses_latest_naming_a_path_outside(tmp_path, capsys):
    folder, other = tmp_path / "ds", tmp_path / "other"
    folder.mkdir()
    write_checkpoint(other / "step_00000002", "data_cache/none")
    (folder / "latest").write_text("../other/step_00000002")
    assert export_main([str(folder), str(tmp_path / "out")]) == 2
    assert "not a step_N (or DeepSpeed global_stepN) folder in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
