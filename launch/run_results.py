"""What one run of a sweep left behind, as the report and its plot read it: the loss curves (metrics.jsonl or
the W&B files), and how runs of one layout are told apart (the axis) and ranked (the best of each layout)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from train.metrics import read_jsonl, read_wandb_file


@dataclass
class RunResult:
    name: str
    run_dir: Path
    train: list[dict] = field(default_factory=list)  # one record per step, in step order
    val: list[dict] = field(default_factory=list)
    pattern: str = "?"
    moe: bool | None = None
    params: dict = field(default_factory=dict)  # count_params: total, active, ...
    max_steps: int | None = None
    checkpoint: Path | None = None
    probe: dict | None = None  # {"K=n": {"acc": ...}, "chance": ..., "eval": "mqar" | absent (the probe)}
    group: str = ""  # runs of one layout (sweep.json's ratio and MoE); the name when there is no sweep.json
    overrides: list[str] = field(default_factory=list)
    axis: dict = field(default_factory=dict)  # what sets this run apart within its group, e.g. {"lr": "1e-3"}

    @property
    def final_step(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    def train_loss(self, tail: float = 0.1) -> float:
        """Mean train loss over the last `tail` of the logged steps: one record is noisy at a small batch."""
        curve = self.train_curve(tail)
        return curve[-1] if curve else math.nan

    def train_curve(self, tail: float = 0.1) -> list[float]:
        """At each logged step s, the mean of the records in (s - tail * final_step, s]: the table's
        train loss is the last point, so the plotted curve ends exactly on it."""
        width = self.final_step * tail
        steps = [r["step"] for r in self.train]
        out, lo = [], 0
        for i, s in enumerate(steps):
            while steps[lo] < s - width:
                lo += 1
            window = [r["train/loss"] for r in self.train[lo : i + 1]]
            out.append(sum(window) / len(window))
        return out

    @property
    def val_loss(self) -> float:
        return self.val[-1]["val/loss"] if self.val else math.nan

    def tokens_per_s(self) -> float:
        """Median over the logged records after the first (which includes start-up)."""
        vals = sorted(r["perf/tokens_per_s"] for r in self.train[1:] if "perf/tokens_per_s" in r)
        return vals[len(vals) // 2] if vals else math.nan


# ---- reading ------------------------------------------------------------------------------------------
def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, else every W&B run file under run_dir/wandb in time order (a resume adds one).
    JSONL is the sturdier record: it is flushed per line, while a W&B session killed hard (SIGKILL, OOM)
    loses what its service process had buffered."""
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        return read_jsonl(jsonl)
    rows = []
    files = [*run_dir.glob("wandb/offline-run-*/run-*.wandb"), *run_dir.glob("wandb/run-*/run-*.wandb")]
    for f in sorted(files, key=lambda f: f.parent.name.split("-", 2)[-1]):  # by the directory's timestamp
        rows += read_wandb_file(f)
    return rows


def curves(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, val) records, one per step (the last logged), sorted by step; events are left out."""
    train, val = {}, {}
    for r in records:
        if "event" in r or not isinstance(r.get("step"), int | float):
            continue
        if isinstance(r.get("train/loss"), int | float):
            train[int(r["step"])] = r
        if isinstance(r.get("val/loss"), int | float):
            val[int(r["step"])] = r
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def best_runs(results: list[RunResult]) -> list[RunResult]:
    """The run with the lowest final val loss in each group (groups in first-seen order); a group whose
    runs logged no val loss keeps its first run."""
    best = []
    for g in dict.fromkeys(r.group for r in results):
        members = [r for r in results if r.group == g]
        scored = [r for r in members if not math.isnan(r.val_loss)]
        best.append(min(scored, key=lambda r: r.val_loss) if scored else members[0])
    return best


def has_axis(results: list[RunResult]) -> bool:
    return any(r.axis for r in results)


def recall_keys(results: list[RunResult]) -> list[str]:
    """The K=n columns any run was scored on, by n."""
    ks = {k for r in results for k in (r.probe or {}) if k.startswith("K=")}
    return sorted(ks, key=lambda k: int(k[2:]))


def axis_label(r: RunResult) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.axis.items()) or "–"
