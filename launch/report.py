"""Results of a sweep: `python -m launch.report runs/sweep-NAME [-o report.md] [--plot loss.png]`.

Reads each run's metrics.jsonl (or, without one, its offline W&B files), its newest checkpoint's
model_config.json (parameter counts) and scores that checkpoint for recall: a run trained on an MQAR
corpus on that corpus's val split (launch/recall.py, cached in <run>/recall.json), any other with the
associative-recall probe (launch/probe.py, cached in <run>/probe.json). Writes a Markdown table and a
PNG. A record logged twice for one step (a resumed or rolled-back run) counts once: the last one wins.

When the sweep has an axis (e.g. an lr sweep: --axis optim.lr=...), runs of one layout are a group and
the report first lists the best run of each group (lowest final val loss) with its axis value, then
every run; the plot shows the best runs. The plot's curves are the logged points (train loss: the same
trailing mean over the last 10% of steps as the table, so each curve ends on its table value).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .commands import NAME
from .probe import ProbeConfig, chance
from .report_plot import plot, plot_title
from .run_results import RunResult, axis_label, best_runs, curves, has_axis, read_records, recall_keys

log = logging.getLogger("launch.report")


# ---- reading ------------------------------------------------------------------------------------------
def load_run(run_dir: Path, name: str | None = None) -> RunResult:
    from jamba import JambaConfig
    from jamba.counting import count_params
    from train.checkpoint_layout import MODEL_CONFIG_FILE, find_latest, read_state

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
    """Recall of the run's newest checkpoint: on its MQAR corpus when it trained on one (<run>/recall.json),
    else the probe's prompts (<run>/probe.json); a cache is used when it scored that step the same way.
    `data`: the corpus to read (a checkpoint's own data.path is used only if it is a local directory)."""
    if res.checkpoint is None:
        return None
    from .recall import is_mqar_run

    mqar = is_mqar_run(res.checkpoint, data)
    cache = res.run_dir / ("recall.json" if mqar else "probe.json")
    key = {"checkpoint": res.checkpoint.name, "config": "mqar-val" if mqar else repr(cfg)}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["result"]
    log.info("scoring recall of %s (%s)", res.run_dir.name, res.checkpoint.name)
    if mqar:
        from .recall import recall_checkpoint

        result = recall_checkpoint(res.checkpoint, data, device=device)
    else:
        from .probe import probe_checkpoint

        result = probe_checkpoint(res.checkpoint, cfg, device, data)
    cache.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def read_sweep(sweep_dir: Path) -> dict:
    """sweep.json (the plan launch.sweep wrote), or {} for a plain directory of runs."""
    manifest = sweep_dir / "sweep.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def find_runs(sweep_dir: Path) -> list[tuple[str, Path]]:
    """Runs in the sweep manifest's order (sweep.json), else every subdirectory holding metrics or W&B files."""
    if variants := read_sweep(sweep_dir).get("variants"):
        names = [v["name"] for v in variants]
        for (
            n
        ) in names:  # a run directory inside the sweep, never a path elsewhere (probe.json is written there)
            if not (isinstance(n, str) and NAME.fullmatch(n)) or n in (".", ".."):
                raise ValueError(
                    f"{sweep_dir / 'sweep.json'}: variant name {str(n)[:100]!r} is not a plain directory name"
                )
        return [(n, sweep_dir / n) for n in names if (sweep_dir / n).is_dir()]
    return [
        (p.name, p)
        for p in sorted(sweep_dir.iterdir())
        if p.is_dir() and ((p / "metrics.jsonl").is_file() or (p / "wandb").is_dir())
    ]


# Overrides that differ between every run of a sweep by construction, never an axis.
_PER_RUN = ("run_name", "run_dir", "logging.wandb.tags")


def assign_groups(results: list[RunResult], sweep: dict) -> None:
    """Group runs by layout (sweep.json's ratio + MoE + mixer) and record each run's axis values: the overrides
    that differ between the runs of its group (e.g. optim.lr), by their last key part."""
    plan = {v["name"]: v for v in sweep.get("variants", [])}
    for r in results:
        v = plan.get(r.name)
        mixer = (
            v.get("mixer", "mamba") if v else "mamba"
        )  # the sweep's --mixers (named only when not Mamba-1)
        r.group = (
            f"{v['ratio'].replace(':', 'to')}-{'moe' if v['moe'] else 'dense'}"
            + (f"-{mixer}" if mixer != "mamba" and v["ratio"] != "attn" else "")
            if v
            else r.name
        )
        r.overrides = list(v["overrides"]) if v else []
    for g in dict.fromkeys(r.group for r in results):
        members = [r for r in results if r.group == g]
        values: dict[str, set] = {}
        for r in members:
            for o in r.overrides:
                k, _, val = o.partition("=")
                if k not in _PER_RUN:
                    values.setdefault(k, set()).add(val)
        varying = [k for k, vs in values.items() if len(vs) > 1 or len(members) > 1 and _missing(members, k)]
        for r in members:
            own = dict(o.partition("=")[::2] for o in r.overrides)
            r.axis = {k.rsplit(".", 1)[-1]: own.get(k, "–") for k in varying}


def _missing(members: list[RunResult], key: str) -> bool:
    return any(not any(o.startswith(key + "=") for o in r.overrides) for r in members)


# ---- writing ------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _millions(n: int | None) -> str:
    return "–" if not n else f"{n / 1e6:.2f}M"


def _steps(r: RunResult) -> str:
    return f"{r.final_step}" + (f"/{r.max_steps}" if r.max_steps and r.final_step < r.max_steps else "")


def best_table(results: list[RunResult]) -> list[str]:
    """One row per layout: its best run (lowest final val loss) over the axis."""
    ks = recall_keys(results)
    axis = next((r.axis for r in results if r.axis), {})
    head = ["variant", "layout", "params", "best " + "/".join(axis) if axis else "best"]
    head += ["steps", "val loss", *[f"recall {k}" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in best_runs(results):
        row = [
            r.group,
            f"`{r.pattern}`",
            _millions(r.params.get("total")),
            axis_label(r),
            _steps(r),
            _fmt(r.val_loss),
        ]
        row += [_fmt((r.probe or {}).get(k, {}).get("acc"), ".3f") for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(results: list[RunResult], probe_cfg: ProbeConfig | None) -> str:
    ks = recall_keys(results)
    axis = has_axis(results)
    head = [
        "variant",
        "layout",
        "params total / active",
        *(["axis"] if axis else []),
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
        row = [
            r.name,
            f"`{r.pattern}`",
            f"{_millions(r.params.get('total'))} / {_millions(r.params.get('active'))}",
            *([axis_label(r)] if axis else []),
            _steps(r),
            f"{last.get('train/tokens', 0):,}",
            _fmt(r.train_loss()),
            _fmt(r.val_loss),
            _fmt(r.tokens_per_s(), ",.0f"),
        ]
        row += [_fmt((r.probe or {}).get(k, {}).get("acc"), ".3f") for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    if axis:
        lines = [
            "Best run of each layout (lowest final val loss over the axis):",
            "",
            *best_table(results),
            "",
            "Every run:",
            "",
            *lines,
        ]
    notes = [
        "",
        "Layout: `*` attention, `M` Mamba, `E` MoE feed-forward. Parameters count embeddings "
        "(jamba/counting.py). Val loss: the last validation pass. tokens/s: median of the logged steps.",
    ]
    scored = [r.probe for r in results if r.probe]
    if any(p.get("eval") == "mqar" for p in scored):
        p = next(p for p in scored if p.get("eval") == "mqar")
        n = {k: v["examples"] for k, v in p.items() if k.startswith("K=")}
        notes.append(
            f"Recall K=n: MQAR with n key-value pairs (launch/recall.py), the share of answers where the argmax "
            f"over the whole vocabulary is the right value, on the corpus's val split ({min(n.values())} "
            f"examples per K, every key queried once); chance {p['chance']:.4f}. Train and val loss are the "
            f"cross-entropy on the answer tokens only."
        )
    elif scored and probe_cfg:
        notes.append(
            f"Recall K=n: in-context associative recall with n key-value pairs (launch/probe.py), accuracy "
            f"of the argmax over the {int(round(1 / chance()))} possible values on {probe_cfg.num_prompts} "
            f"seeded prompts per K; random chance {chance():.2f}."
        )
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep_dir", help="runs/sweep-NAME (or any directory of run directories)")
    p.add_argument("-o", "--output", help="Markdown file (default: print)")
    p.add_argument("--plot", help="PNG of the loss curves and recall")
    p.add_argument("--no-probe", action="store_true", help="skip recall (the MQAR eval and the probe)")
    p.add_argument("--pairs", default="4,8,16", help="probe: numbers of key-value pairs (MQAR: the corpus's)")
    p.add_argument("--prompts", type=int, default=200, help="probe: prompts per K")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--data", help="probe: corpus whose tokenizer to use (default: each run's local data.path)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", stream=sys.stderr
    )  # progress; the table: stdout
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
    sweep = read_sweep(sweep_dir)
    assign_groups(results, sweep)
    text = markdown(results, probe_cfg)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(text)
        print(f"wrote {a.output}")
    else:
        sys.stdout.write(text)
    if a.plot:
        plot(results, Path(a.plot), plot_title(sweep_dir, sweep))
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
