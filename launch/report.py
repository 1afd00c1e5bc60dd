"""Results of a sweep: `python -m launch.report runs/sweep-NAME [-o report.md] [--plot loss.png]`.

Reads each run's metrics.jsonl (or, without one, its offline W&B files), its newest checkpoint's
model_config.json (parameter counts) and scores that checkpoint with the associative-recall probe
(launch/probe.py; cached in <run>/probe.json). Writes a Markdown table and a PNG of the loss curves.
A record logged twice for one step (a resumed or rolled-back run) counts once: the last one wins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from train.metrics import read_jsonl, read_wandb_file

from .commands import NAME
from .probe import ProbeConfig, chance


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
    probe: dict | None = None

    @property
    def final_step(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    def train_loss(self, tail: float = 0.1) -> float:
        """Mean train loss over the last `tail` of the logged steps: one record is noisy at a small batch."""
        if not self.train:
            return math.nan
        cut = self.final_step * (1 - tail)
        vals = [r["train/loss"] for r in self.train if r["step"] >= cut]
        return sum(vals) / len(vals)

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


def load_run(run_dir: Path, name: str | None = None) -> RunResult:
    from jamba import JambaConfig
    from jamba.counting import count_params
    from train.checkpoint import MODEL_CONFIG_FILE, find_latest, read_state

    res = RunResult(name or run_dir.name, run_dir)
    res.train, res.val = curves(read_records(run_dir))
    res.checkpoint = find_latest(run_dir / "checkpoints")
    if res.checkpoint is not None:
        state = read_state(res.checkpoint)
        res.max_steps = state.get("config", {}).get("trainer", {}).get("max_steps")
        mc = res.checkpoint / MODEL_CONFIG_FILE
        cfg = JambaConfig.from_dict(json.loads(mc.read_text()) if mc.is_file() else state["model_config"])
        res.pattern, res.moe = cfg.pattern, any(cfg.layers_is_moe)
        res.params = count_params(cfg)
    return res


def probe_run(res: RunResult, cfg: ProbeConfig, device: str = "cpu", data: str | None = None) -> dict | None:
    """The probe's scores on the run's newest checkpoint, from <run>/probe.json when it scored that step
    with the same settings."""
    if res.checkpoint is None:
        return None
    from .probe import probe_checkpoint

    cache = res.run_dir / "probe.json"
    key = {"checkpoint": res.checkpoint.name, "config": repr(cfg)}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["result"]
    result = probe_checkpoint(res.checkpoint, cfg, device, data)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def find_runs(sweep_dir: Path) -> list[tuple[str, Path]]:
    """Runs in the sweep manifest's order (sweep.json), else every subdirectory holding metrics or W&B files."""
    manifest = sweep_dir / "sweep.json"
    if manifest.is_file():
        names = [v["name"] for v in json.loads(manifest.read_text())["variants"]]
        for (
            n
        ) in names:  # a run directory inside the sweep, never a path elsewhere (probe.json is written there)
            if not (isinstance(n, str) and NAME.fullmatch(n)) or n in (".", ".."):
                raise ValueError(f"{manifest}: variant name {str(n)[:100]!r} is not a plain directory name")
        return [(n, sweep_dir / n) for n in names if (sweep_dir / n).is_dir()]
    return [
        (p.name, p)
        for p in sorted(sweep_dir.iterdir())
        if p.is_dir() and ((p / "metrics.jsonl").is_file() or (p / "wandb").is_dir())
    ]


# ---- writing ------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _millions(n: int | None) -> str:
    return "–" if not n else f"{n / 1e6:.2f}M"


def markdown(results: list[RunResult], probe_cfg: ProbeConfig | None) -> str:
    ks = [f"K={k}" for k in probe_cfg.num_pairs] if probe_cfg else []
    head = [
        "variant",
        "layout",
        "params total / active",
        "steps",
        "tokens",
        "train loss (last 10%)",
        "val loss",
        "tokens/s",
        *[f"recall {k}" for k in ks],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        last = r.train[-1] if r.train else {}
        steps = f"{r.final_step}" + (f"/{r.max_steps}" if r.max_steps and r.final_step < r.max_steps else "")
        row = [
            r.name,
            f"`{r.pattern}`",
            f"{_millions(r.params.get('total'))} / {_millions(r.params.get('active'))}",
            steps,
            f"{last.get('train/tokens', 0):,}",
            _fmt(r.train_loss()),
            _fmt(r.val[-1]["val/loss"] if r.val else None),
            _fmt(r.tokens_per_s(), ",.0f"),
        ]
        row += [_fmt((r.probe or {}).get(k, {}).get("acc"), ".2f") for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        "Layout: `*` attention, `M` Mamba, `E` MoE feed-forward. Parameters count embeddings "
        "(jamba/counting.py). Val loss: the last validation pass. tokens/s: median of the logged steps.",
    ]
    if probe_cfg:
        notes.append(
            f"Recall K=n: in-context associative recall with n key-value pairs (launch/probe.py), accuracy "
            f"of the argmax over the {int(round(1 / chance()))} possible values on {probe_cfg.num_prompts} "
            f"seeded prompts per K; random chance {chance():.2f}."
        )
    return "\n".join(lines + notes) + "\n"


def plot(results: list[RunResult], path: Path, probe_cfg: ProbeConfig | None) -> None:
    """Train loss (smoothed) and val loss against tokens, one line per variant: colour = attention:Mamba
    ratio, dashed = dense; with probe scores, recall accuracy against K."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or -e '.[test]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_probe = probe_cfg is not None and any(r.probe for r in results)
    fig, axes = plt.subplots(1, 3 if with_probe else 2, figsize=(13 if with_probe else 9.5, 3.8), dpi=80)
    ratios = list(dict.fromkeys(r.name.split("-")[0] for r in results))
    colours = {ratio: plt.get_cmap("tab10")(i) for i, ratio in enumerate(ratios)}
    late: list[float] = []  # train losses after the first fifth of training: the y range worth showing
    for r in results:
        style = dict(
            color=colours[r.name.split("-")[0]],
            linestyle="--" if r.moe is False else "-",
            label=r.name,
            linewidth=1.3,
        )
        if r.train:
            ema, ys = None, []
            for rec in r.train:  # EMA over logged records: the raw per-step loss is noisy at this batch size
                ema = rec["train/loss"] if ema is None else 0.8 * ema + 0.2 * rec["train/loss"]
                ys.append(ema)
            axes[0].plot([rec.get("train/tokens", rec["step"]) / 1e3 for rec in r.train], ys, **style)
            late += [y for rec, y in zip(r.train, ys, strict=True) if rec["step"] > 0.2 * r.final_step]
        if r.val:
            tok = {rec["step"]: rec.get("train/tokens") for rec in r.train}
            xs = [(tok.get(v["step"]) or v["step"]) / 1e3 for v in r.val]
            axes[1].plot(xs, [v["val/loss"] for v in r.val], marker="o", markersize=3, **style)
        if with_probe and r.probe:
            ks = [k for k in probe_cfg.num_pairs if f"K={k}" in r.probe]
            axes[2].plot(ks, [r.probe[f"K={k}"]["acc"] for k in ks], marker="o", **style)
    axes[0].set(title="train loss (EMA)", xlabel="tokens (thousands)", ylabel="loss")
    if late:
        axes[0].set_ylim(min(late) * 0.97, max(late) * 1.03)
    axes[1].set(title="validation loss", xlabel="tokens (thousands)")
    if with_probe:
        axes[2].axhline(chance(), color="grey", linewidth=0.8, linestyle=":", label="chance")
        axes[2].set(
            title="associative recall",
            xlabel="key-value pairs in context (K)",
            ylabel="accuracy",
            ylim=(0, 1),
            xticks=list(probe_cfg.num_pairs),
        )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep_dir", help="runs/sweep-NAME (or any directory of run directories)")
    p.add_argument("-o", "--output", help="Markdown file (default: print)")
    p.add_argument("--plot", help="PNG of the loss curves")
    p.add_argument("--no-probe", action="store_true", help="skip the associative-recall probe")
    p.add_argument("--pairs", default="4,8,16", help="probe: numbers of key-value pairs")
    p.add_argument("--prompts", type=int, default=200, help="probe: prompts per K")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--data", help="probe: corpus whose tokenizer to use (default: each run's local data.path)"
    )
    a = p.parse_args(argv)
    sweep_dir = Path(a.sweep_dir)
    try:
        runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no runs under {sweep_dir}", file=sys.stderr)
        return 2
    probe_cfg = (
        None
        if a.no_probe
        else ProbeConfig(num_pairs=tuple(int(k) for k in a.pairs.split(",")), num_prompts=a.prompts)
    )
    results = []
    for name, run_dir in runs:
        res = load_run(run_dir, name)
        if probe_cfg is not None:
            res.probe = probe_run(res, probe_cfg, a.device, a.data)
        results.append(res)
    text = markdown(results, probe_cfg)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text)
        print(f"wrote {a.output}")
    else:
        sys.stdout.write(text)
    if a.plot:
        plot(results, Path(a.plot), probe_cfg)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
