"""Named sweeps for `python -m launch.sweep --sweep NAME`: the model, steps, layouts, axes, shared
overrides and (for a generated corpus) the `python -m data.prepare` arguments that make its data.

A preset only fills in defaults: any flag given on the command line wins, `--axis` adds an axis, and
overrides after `--` come after the preset's (so they win too).

    mqar       attention, 1:3, 1:7, Mamba (MoE off) x 3 learning rates on the MQAR corpus, one GPU
    mqar-tiny  the same pipeline at a CPU size (2 learning rates), minutes on a laptop
    lm-gpu     the same 4 layouts at ~100M parameters on the built-in stdlib corpus, one GPU
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATIOS = ["attn", "1:3", "1:7", "mamba"]


@dataclass(frozen=True)
class SweepPreset:
    defaults: dict  # launch.sweep flags (dest names): preset, steps, ratios, moe, axis, experiment, name, ...
    overrides: list[str] = field(default_factory=list)  # Hydra overrides for every run
    prepare: list[str] = field(default_factory=list)  # python -m data.prepare arguments, run first


def mqar_corpus(path: str, pairs: str, seq_len: int, keys: int, values: int, examples: int, val: int):
    """The prepare arguments and the matching data overrides of one MQAR corpus (one place for both)."""
    prepare = ["--synthetic", "mqar", "-o", path, "--pairs", pairs, "--seq-len", str(seq_len)]
    prepare += ["--keys", str(keys), "--values", str(values), "--examples", str(examples)]
    prepare += ["--val-examples", str(val), "--seed", "0", "--shards", "16"]
    data = [f"data.path={path}", f"data.seq_len={seq_len}", "data.num_streams=8"]
    return prepare, data


_MQAR_PREPARE, _MQAR_DATA = mqar_corpus("data_cache/mqar-t256", "4,8,16,32,48", 256, 512, 512, 100_000, 5_000)
_TINY_PREPARE, _TINY_DATA = mqar_corpus("data_cache/mqar-tiny", "2,4,8", 64, 16, 16, 4_000, 600)
# Short runs: no W&B (its start-up costs seconds per run; metrics.jsonl is what the report reads), no
# compilation (a minute per run), a checkpoint only at the end (what the report scores).
_SHORT = [
    "logging.wandb.mode=disabled",
    "parallel.compile=none",
    "checkpoint.interval=0",
    "checkpoint.keep_last=1",
]

SWEEPS: dict[str, SweepPreset] = {
    "mqar": SweepPreset(
        defaults=dict(
            name="mqar",
            preset="mqar",
            steps=1000,
            ratios=RATIOS,
            moe=[False],
            axis=["optim.lr=2.5e-4,5e-4,1e-3,2e-3"],
            experiment="",
            # 8 runs at a time share the GPU (a 2M-parameter model leaves it and the CPU cores mostly idle),
            # each stopped at 260 s (start-up included): 16 runs in two waves inside a 10-minute command.
            # Measured on an H200 alone: ~10 steps/s (session 4, 600 steps at 40 s stopped at 210-350).
            jobs=8,
            timeout=260,
        ),
        overrides=[
            *_MQAR_DATA,
            "data.micro_batch_size=256",  # 1000 x 256 = 256,000 examples: 2.6 passes over the train split
            "schedule.warmup_steps=30",
            "trainer.eval_interval=100",
            "trainer.eval_batches=0",  # the whole val split (5,000 examples)
            "logging.interval=10",
            *_SHORT,
        ],
        prepare=_MQAR_PREPARE,
    ),
    "mqar-tiny": SweepPreset(
        defaults=dict(
            name="mqar-tiny",
            preset="mqar",
            steps=60,
            ratios=RATIOS,
            moe=[False],
            axis=["optim.lr=3e-3,1e-2"],
            experiment="",
        ),
        overrides=[
            *_TINY_DATA,
            "model.vocab_size=36",  # 4 specials + 16 keys + 16 values
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.mamba_d_state=8",
            "data.micro_batch_size=16",
            "schedule.warmup_steps=5",
            "trainer.eval_interval=20",
            "trainer.eval_batches=0",
            "logging.interval=5",
            *_SHORT,
        ],
        prepare=_TINY_PREPARE,
    ),
    "lm-gpu": SweepPreset(
        defaults=dict(
            name="lm-gpu",
            preset="lm-100m",
            steps=1000,
            ratios=RATIOS,
            moe=[False],
            axis=[],
            experiment="",
            timeout=140,  # 4 runs end inside 10 minutes; a stopped run resumes on the rerun
        ),
        overrides=[
            "data.seq_len=1024",
            "data.micro_batch_size=16",  # 16,384 tokens a step, 16.4M tokens a run
            "optim.lr=1e-3",
            "schedule.warmup_steps=100",
            "trainer.eval_interval=100",
            "trainer.eval_batches=20",
            "logging.interval=10",
            *_SHORT,
        ],
    ),
}
