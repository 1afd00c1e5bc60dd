"""Named sweeps: what `--sweep mqar` / `lm-gpu` plan (layouts of one size, MoE off, one lr axis, the
corpus the runs read is the one the preset prepares), and that command-line flags still win."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from data.synthetic import MQARSpec
from jamba.counting import count_params
from launch import sweep, sweep_run
from launch.sweep_presets import SWEEPS
from train.config import build_model_config


def _plan(tmp_path, *args):
    assert sweep.main(["--root", str(tmp_path), "--dry-run", *args]) == 0
    name = args[args.index("--sweep") + 1] if "--name" not in args else args[args.index("--name") + 1]
    return json.loads((tmp_path / f"sweep-{name}" / "sweep.json").read_text())


def _value(overrides, key):
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def test_mqar_plan_is_four_dense_layouts_times_four_lrs(tmp_path):
    plan = _plan(tmp_path, "--sweep", "mqar")
    assert plan["sweep"] == "mqar" and plan["preset"] == "mqar" and plan["steps"] == 1000
    variants = plan["variants"]
    assert len(variants) == 16 and not any(v["moe"] for v in variants)
    assert {v["layer_pattern"] for v in variants} == {"********", "MM*MMM*M", "MMMM*MMM", "MMMMMMMM"}
    lrs = {v["ratio"]: [] for v in variants}
    for v in variants:
        lrs[v["ratio"]].append(_value(v["overrides"], "optim.lr"))
        assert _value(v["overrides"], "model.num_experts") == "1"
    assert all(
        vals == ["2.5e-4", "5e-4", "1e-3", "2e-3"] for vals in lrs.values()
    )  # each layout its own lr sweep
    varying = ("model.layer_pattern", "optim.lr", "run_name", "run_dir", "logging.wandb.tags")
    shared = [{o for o in v["overrides"] if not o.startswith(varying)} for v in variants]
    assert all(s == shared[0] for s in shared)


def test_the_runs_read_the_corpus_the_preset_prepares(tmp_path):
    for name in ("mqar", "mqar-tiny"):
        prep = SWEEPS[name].prepare
        arg = dict(zip(prep[0::2], prep[1::2], strict=True))
        overrides = _plan(tmp_path, "--sweep", name)["variants"][0]["overrides"]
        assert _value(overrides, "data.path") == arg["-o"]
        assert _value(overrides, "data.seq_len") == arg["--seq-len"]
        spec = MQARSpec(num_keys=int(arg["--keys"]), num_values=int(arg["--values"]))
        cfg = sweep.compose(overrides)[0]
        assert build_model_config(cfg.model).vocab_size >= spec.vocab_size


def test_lm_gpu_layouts_are_about_100m_parameters(tmp_path):
    variants = _plan(tmp_path, "--sweep", "lm-gpu")["variants"]
    assert [v["ratio"] for v in variants] == ["attn", "1:3", "1:7", "mamba"]
    for v, cfg in zip(variants, sweep.compose(*(v["overrides"] for v in variants)), strict=True):
        total = count_params(build_model_config(cfg.model))["total"]
        assert 70e6 < total < 110e6, (v["name"], total)
        assert cfg.data.seq_len == 1024 and cfg.parallel.compile == "none"


@pytest.mark.parametrize("name", ["mqar", "lm-gpu"])
def test_mixer_axis_compares_mamba1_and_mamba2_hybrids_at_equal_width_and_depth(tmp_path, name):
    plan = _plan(tmp_path, "--sweep", name, "--ratios", "attn,1:7", "--mixers", "mamba,mamba2")
    variants = {v["name"].split("-lr-")[0]: v for v in plan["variants"] if _key_lr(v) in (None, "1e-3")}
    assert sorted(variants) == ["1to7-dense", "1to7-dense-mamba2", "attn-dense"]  # attention-only runs once
    m1, m2 = variants["1to7-dense"], variants["1to7-dense-mamba2"]
    assert (m1["mixer"], m2["mixer"]) == ("mamba", "mamba2")
    assert m2["layer_pattern"] == m1["layer_pattern"].replace("M", "S") != m1["layer_pattern"]
    differ = ("model.layer_pattern", "run_name", "run_dir", "logging.wandb.tags")
    assert [o for o in m1["overrides"] if not o.startswith(differ)] == [
        o for o in m2["overrides"] if not o.startswith(differ)
    ]
    c1, c2 = (build_model_config(c.model) for c in sweep.compose(m1["overrides"], m2["overrides"]))
    assert (c1.hidden_size, c1.num_hidden_layers) == (c2.hidden_size, c2.num_hidden_layers)
    assert c2.layers_block_type.count("mamba2") == c1.layers_block_type.count("mamba") > 0
    n1, n2 = count_params(c1)["total"], count_params(c2)["total"]
    assert 0.8 < n2 / n1 < 1.2, (n1, n2)  # comparable sizes


def _key_lr(v):
    lrs = [o.split("=", 1)[1] for o in v["overrides"] if o.startswith("optim.lr=")]
    return lrs[-1] if lrs else None


def test_gpu_sweeps_fit_one_10_minute_command():
    """Each run is stopped at the preset's timeout (start-up included): an lm-gpu sweep ends inside 10 minutes,
    an MQAR sweep in one (its runs in waves of --jobs at a time; the same command skips finished runs)."""
    mqar = SWEEPS["mqar"].defaults
    waves = -(-len(mqar["ratios"]) * len(mqar["axis"][0].split(",")) // mqar["jobs"])
    assert mqar["timeout"] * waves < 570  # + preparing the corpus
    assert SWEEPS["lm-gpu"].defaults["timeout"] * 4 < 590


def test_flags_and_overrides_win_over_the_preset(tmp_path):
    plan = _plan(tmp_path, "--sweep", "mqar", "--steps", "7", "--ratios", "attn", "--", "optim.lr=1e-4")
    assert plan["steps"] == 7 and len(plan["variants"]) == 4
    # an override after -- comes after the preset's, but the lr axis is still set per run (it comes last)
    assert all(
        _value(v["overrides"], "optim.lr") in ("2.5e-4", "5e-4", "1e-3", "2e-3") for v in plan["variants"]
    )
    more = _plan(tmp_path / "b", "--sweep", "mqar", "--ratios", "attn", "--axis", "model.use_rope=false,true")
    assert len(more["variants"]) == 8  # --axis adds an axis to the preset's


def test_a_run_stopped_at_the_timeout_is_reported_as_stopped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sweep_run, "local_command", lambda nproc, o: [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    v = sweep.Variant("attn-dense", "attn", False, "****", [], tmp_path / "attn-dense")
    assert sweep.run_local([v], 1, False, timeout=0.5) == {"attn-dense": sweep.TIMED_OUT}
    assert "stopped at --timeout 0.5s (the same command resumes it)" in capsys.readouterr().out


def test_runs_go_jobs_at_a_time_each_with_its_own_timeout(tmp_path, monkeypatch, capsys):
    # three runs, two at a time: the two that sleep are both stopped at the timeout, the quick one is ok,
    # and b started before a was stopped (both ran in the first wave)
    cmds = {"a": "import time; time.sleep(30)", "b": "import time; time.sleep(30)", "c": "pass"}
    monkeypatch.setattr(sweep_run, "local_command", lambda nproc, o: [sys.executable, "-c", cmds[o[0]]])
    vs = [sweep.Variant(n, "attn", False, "****", [n], tmp_path / n) for n in cmds]
    got = sweep.run_local(vs, 1, False, timeout=2.0, jobs=2)
    assert got == {"a": sweep.TIMED_OUT, "b": sweep.TIMED_OUT, "c": 0}
    out = capsys.readouterr().out
    assert out.index("[2/3] b (****): starting") < out.index("[1/3] a: stopped")


def test_jobs_below_one_is_a_config_error(tmp_path, capsys):
    assert sweep.main(["--name", "t", "--root", str(tmp_path), "--jobs", "0", "--dry-run"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_stopped_sweep_stops_its_runs(tmp_path, monkeypatch):
    # timeout(1) sends SIGTERM to the sweep only; its runs live in their own sessions and must not be orphaned
    # (seen on the GPU: orphaned runs kept training and the resumed sweep collided with them)
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(
        sweep_run, "local_command", lambda n, o: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    monkeypatch.setattr(
        sweep.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1]
    )
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    v = sweep.Variant("a", "attn", False, "*", [], tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        sweep.run_local([v], 1, False, None)
    assert len(started) == 1 and started[0].poll() is not None, "the run outlived its sweep"
    assert signal.getsignal(signal.SIGTERM) is before  # the sweep's handler is gone again
