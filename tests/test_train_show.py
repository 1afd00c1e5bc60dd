"""What a user sees of a run without starting one: `--cfg job`, `--help`, the layout table; and the console
parts of a run (val sample size, end summary, progress lines) on stand-in objects."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from jamba import PRESETS, get_preset
from train.config import Config, register, to_config
from train.config_docs import field_doc, first_sentence, setting_doc, walk
from train.metrics import Metrics, WandbSink, val_sample
from train.progress import progress
from train.show import CONF, help_text, layout_table, layout_text, model_values
from train.summary import summary_lines

ROOT = Path(__file__).resolve().parent.parent
register()
pytestmark = pytest.mark.timeout(60)


def compose_cfg(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train", *args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )


def test_cfg_job_shows_the_presets_values_resolved_and_the_layout():
    p = run_train(
        "--cfg", "job", "model=bench", "model.num_hidden_layers=4", "model.layer_pattern=M*EMME", "run_name=x"
    )
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"hidden_size: {PRESETS['bench']['hidden_size']}" in out and "null\n  hidden" not in out
    assert "num_hidden_layers: 4" in out and "layer_pattern: M*EMME" in out
    assert "dir: runs/x/checkpoints" in out and "run_dir: runs/x" in out and "${" not in out
    assert "# layout M*EMME (4 layers: 3 mamba, 1 attention" in out
    assert "#   mixer M * M M" in out and "#   ffn   - E - E" in out
    bad = run_train("--cfg", "job", "model.hidden_sise=3")
    assert bad.returncode == 2 and "hidden_sise" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_model_values_take_the_corpus_vocabulary_and_ids():
    m = model_values(compose_cfg())  # the built-in corpus: byte tokenizer, 259 ids
    assert m.vocab_size == 320 and (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (256, 257, 258)
    assert model_values(compose_cfg("model.vocab_size=1024")).vocab_size == 1024


def test_help_lists_groups_and_describes_every_setting():
    cfg = compose_cfg("model=mqar")
    text = help_text(cfg, model_values(cfg))
    assert "model        ablation-1.3b, ablation-7b, bench" in text
    for key, cls, f, _tp in walk(Config):
        assert setting_doc(cls, f.name, _tp), f"{key} has no description in its dataclass source"
        assert f"\n  {key} = " in text
    assert "  model.vocab_size = 1028  # embedding rows" in text  # this command line's value
    assert "  optim.grad_clip = 1.0  # max global grad norm; 0 disables clipping" in text
    assert "  schedule.name = cosine  # the schedule's shape [cosine | wsd | constant]" in text
    assert "\nfaults: Deliberate failures" in text
    assert "  parallel.precision = auto  # auto: bf16 on a GPU, fp32 on CPU; fp32; bf16: DeepSpeed" in text
    p = run_train("--help")
    assert p.returncode == 0 and "  trainer.max_steps = 120  # optimizer steps" in p.stdout


def test_docs_come_from_comments():
    from data.config import DataConfig
    from train.config import ScheduleConfig

    assert field_doc(ScheduleConfig, "total_steps") == "the decay's end"  # `type: ignore` dropped
    assert field_doc(DataConfig, "num_workers").startswith("DataLoader worker processes per rank")  # above
    assert first_sentence("One. Two. Three") == "One" and first_sentence("a e.g. b") == "a e.g. b"


def test_layout_table_wraps_long_models():
    m = get_preset("debug", num_hidden_layers=40, attn_layer_period=8, attn_layer_offset=4)
    rows = layout_table(m)
    assert len(rows) == 6  # 32 + 8 layers: two blocks of index / mixer / ffn
    assert rows[0].split()[1:4] == ["0", "1", "2"] and rows[3].split()[-1] == "39"
    assert rows[1].split()[1:] == ["M", "M", "M", "M", "*", "M", "M", "M"] * 4
    assert layout_text(m).startswith(f"layout {m.pattern} (40 layers: 35 mamba, 5 attention")


def test_val_sample_size_is_named():
    rec = {"val/batches": 8, "val/tokens": 4096, "val/whole_split": 0}
    assert val_sample(rec, 2) == "4 batches x 2 ranks, 4,096 tokens"
    assert val_sample({**rec, "val/whole_split": 1}, 1) == "the whole val split: 8 batches, 4,096 tokens"
    assert val_sample({**rec, "val/batches": 2}, 2) == "1 batch x 2 ranks, 4,096 tokens"


def test_end_summary_names_losses_tokens_checkpoint_and_wandb(tmp_path):
    metrics = Metrics([])
    metrics.log(10, {"train/loss": 2.5})
    metrics.log(12, {"train/loss": 2.25})
    metrics.log(12, {"val/loss": 2.4, "val/batches": 8, "val/tokens": 4096, "val/whole_split": 0})
    wandb = WandbSink.__new__(WandbSink)
    wandb.dir = tmp_path / "wandb" / "offline-run-1"
    metrics.sinks.append(wandb)
    cfg = compose_cfg("trainer.max_steps=12", f"run_dir={tmp_path}")
    ckpt = tmp_path / "checkpoints" / "step_00000012"
    trainer = SimpleNamespace(
        cfg=cfg,
        metrics=metrics,
        step=12,
        tokens=12288,
        samples=96,
        run_dir=tmp_path,
        dist=SimpleNamespace(world_size=2),
        stop=SimpleNamespace(stopping=False),
        checkpointer=SimpleNamespace(latest=lambda: ckpt, root=ckpt.parent),
    )
    lines = summary_lines(trainer, 75.0, 2)
    text = "\n".join(lines)
    assert lines[0] == "run debug finished at step 12/12: 10 steps in 1m15s this job"
    assert "train loss  2.2500 (step 12)" in text
    assert "val loss    2.4000 (step 12; 4 batches x 2 ranks, 4,096 tokens)" in text
    assert "tokens      12,288" in text and f"checkpoint  {ckpt}" in text
    assert f"wandb sync {wandb.dir}" in text
    assert len(lines) <= 12


def test_progress_lines_only_for_long_work(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with progress("quick", total=3, logger=log) as tick:
            for _ in range(3):
                tick()
        assert caplog.text == ""
        with progress("slow", total=2, every_s=0.0, logger=log) as tick:
            tick()
            tick()
        with progress("whole split", every_s=0.0, logger=log) as tick:
            tick(3)
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(",")[0] for ln in lines] == [
        "slow: 1/2 (50%)",
        "slow: 2/2 (100%)",
        "whole split: 3 done",
    ]
