"""The sweep report's PNG (launch.report --plot): train and val loss against tokens and recall against the
number of key-value pairs, one colour per variant; every curve ends on the table's value."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run_results import RunResult


def _colour_key(group: str) -> str:
    """One colour per ratio and non-attention mixer ('1to7', '1to7-mamba2'); MoE and dense share it."""
    from jamba.layers import MIXER_NAMES

    first, *rest = group.split("-")
    return "-".join([first, *(p for p in rest if p in MIXER_NAMES and p != "mamba")])


def plot_title(sweep_dir: Path, sweep: dict) -> str:
    if not sweep:
        return f"runs in {sweep_dir}"
    extra = f", sweep preset {sweep['sweep']}" if sweep.get("sweep") else ""
    return f"sweep {sweep['name']}: model {sweep['preset']}, {sweep['steps']} steps per run{extra}"


def plot(results: list[RunResult], path: Path, title: str = "") -> dict:
    """Train loss (the table's trailing mean, raw records as dots) and val loss against tokens, and
    recall against the number of pairs, one colour per variant (the best run of each layout when the
    sweep has an axis; dashed = dense when MoE runs are there too); one legend below the panels.
    Returns what it drew: {label: {panel: (xs, ys)}}."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or -e '.[test]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run_results import axis_label, best_runs, has_axis, recall_keys

    shown = best_runs(results) if has_axis(results) else results
    ks = recall_keys(shown)
    with_recall = bool(ks)
    fig, axes = plt.subplots(1, 3 if with_recall else 2, figsize=(13 if with_recall else 9.5, 4.6), dpi=80)
    ratios = list(dict.fromkeys(_colour_key(r.group) for r in shown))
    colours = {ratio: plt.get_cmap("tab10")(i) for i, ratio in enumerate(ratios)}
    drawn: dict[str, dict] = {}
    mixed = len({r.moe for r in shown}) > 1
    late: list[float] = []  # train losses after the first fifth of training: the y range worth showing
    for r in shown:
        label = r.group + (f" ({axis_label(r)})" if r.axis else "") if has_axis(results) else r.name
        dashed = r.moe is False and mixed  # dense dashed when the sweep has MoE runs too
        style = dict(color=colours[_colour_key(r.group)], linestyle="--" if dashed else "-", linewidth=1.4)
        drawn[label] = {}
        if r.train:
            xs = [rec.get("train/tokens", rec["step"]) / 1e3 for rec in r.train]
            ys = r.train_curve()
            axes[0].plot(
                xs, [rec["train/loss"] for rec in r.train], ".", color=style["color"], ms=2, alpha=0.35
            )
            axes[0].plot(xs, ys, label=label, **style)
            drawn[label]["train"] = (xs, ys)
            late += [y for rec, y in zip(r.train, ys, strict=True) if rec["step"] > 0.2 * r.final_step]
        if r.val:
            tok = {rec["step"]: rec.get("train/tokens") for rec in r.train}
            xs = [(tok.get(v["step"]) or v["step"]) / 1e3 for v in r.val]
            ys = [v["val/loss"] for v in r.val]
            axes[1].plot(xs, ys, marker="o", markersize=3, **({} if r.train else {"label": label}), **style)
            drawn[label]["val"] = (xs, ys)
        if with_recall and r.probe:
            rk = [k for k in ks if k in r.probe]
            xs, ys = [int(k[2:]) for k in rk], [r.probe[k]["acc"] for k in rk]
            axes[2].plot(xs, ys, marker="o", **({} if r.train or r.val else {"label": label}), **style)
            drawn[label]["recall"] = (xs, ys)
    axes[0].set(
        title="train loss (trailing mean over 10% of the steps)", xlabel="tokens (thousands)", ylabel="loss"
    )
    if late:
        lo, hi = min(late), max(late)
        axes[0].set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    axes[1].set(title="validation loss (each pass)", xlabel="tokens (thousands)")
    if with_recall:
        chances = {r.probe.get("chance") for r in shown if r.probe}
        for c in chances:
            axes[2].axhline(c, color="grey", linewidth=0.8, linestyle=":")
        axes[2].set(
            title=f"recall (chance {', '.join(f'{c:.3g}' for c in sorted(chances))}, dotted)",
            xlabel="key-value pairs in context (K)",
            ylabel="accuracy",
            ylim=(-0.02, 1.02),
            xticks=[int(k[2:]) for k in ks],
        )
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ncol = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = -(-len(labels) // max(ncol, 1))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * rows, 1, 0.95 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return drawn
