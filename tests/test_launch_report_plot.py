"""The report of a sweep with an lr axis: the best run per layout (lowest val loss) with its lr, and a plot
whose curves end on the table's values."""

from pathlib import Path

import pytest

from launch import report


def _run(name, ratio, lr, val_losses, recall):
    train = [{"step": s, "train/loss": 3.0 - 0.01 * s + (0.2 if s % 20 == 0 else 0), "train/tokens": 64 * s}
             for s in range(10, 101, 10)]  # fmt: skip
    val = [{"step": s, "val/loss": v} for s, v in zip((50, 100), val_losses, strict=True)]
    res = report.RunResult(name, Path(name), train=train, val=val, pattern="****", moe=False)
    res.max_steps, res.params = 100, {"total": 1_500_000, "active": 1_500_000}
    res.probe = {**{f"K={k}": {"acc": a, "examples": 10} for k, a in zip((4, 16), recall, strict=True)}}
    res.probe.update(chance=0.002, eval="mqar")
    plan = {"name": name, "ratio": ratio, "moe": False}
    plan["overrides"] = [
        "model=mqar",
        "data.seq_len=256",
        f"optim.lr={lr}",
        f"run_name=s-{name}",
        f"run_dir=x/{name}",
    ]
    return res, plan


@pytest.fixture()
def results():
    runs = [
        _run("attn-dense-lr-1e-3", "attn", "1e-3", (2.0, 1.5), (0.9, 0.7)),
        _run("attn-dense-lr-3e-3", "attn", "3e-3", (1.8, 0.4), (1.0, 0.95)),
        _run("mamba-dense-lr-1e-3", "mamba", "1e-3", (2.5, 2.1), (0.5, 0.1)),
        _run("mamba-dense-lr-3e-3", "mamba", "3e-3", (2.4, 2.3), (0.6, 0.2)),
    ]
    res = [r for r, _ in runs]
    report.assign_groups(res, {"name": "s", "variants": [p for _, p in runs]})
    return res


def test_mamba1_and_mamba2_hybrids_are_separate_layouts():
    runs = [
        _run(n, "1:7", "1e-3", (2.0, 1.5), (0.9, 0.7))
        for n in ("1to7-dense", "1to7-dense-mamba2", "attn-dense")
    ]
    runs[1][1]["mixer"], runs[2][1]["ratio"], runs[2][1]["mixer"] = "mamba2", "attn", "mamba2"
    res = [r for r, _ in runs]
    report.assign_groups(res, {"name": "s", "variants": [p for _, p in runs]})
    assert [r.group for r in res] == ["1to7-dense", "1to7-dense-mamba2", "attn-dense"]


def _row(md, first_cell):
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_best_lr_per_layout_is_the_lowest_val_loss(results):
    assert [r.group for r in results] == ["attn-dense"] * 2 + ["mamba-dense"] * 2
    assert results[0].axis == {"lr": "1e-3"}  # only what differs inside a group is an axis
    md = report.markdown(results, None)
    assert md.startswith("Best run of each layout")
    head = _row(md, "variant")
    assert head[:6] == ["variant", "layout", "params", "best lr", "steps", "val loss"]
    assert _row(md, "attn-dense")[3:] == ["lr=3e-3", "100", "0.400", "1.000", "0.950"]
    assert _row(md, "mamba-dense")[3:] == ["lr=1e-3", "100", "2.100", "0.500", "0.100"]
    assert "chance 0.0020" in md and "answer tokens only" in md
    assert (
        len([line for line in md.splitlines() if line.startswith("| mamba-dense-lr")]) == 2
    )  # every run too


def test_plot_ends_on_the_table_values(results, tmp_path):
    png = tmp_path / "mqar.png"
    drawn = report.plot(results, png, "sweep s: test")
    assert 0 < png.stat().st_size < 300_000
    assert set(drawn) == {"attn-dense (lr=3e-3)", "mamba-dense (lr=1e-3)"}  # the best run of each layout
    md = report.markdown(results, None)
    for label, best in zip(drawn, report.best_runs(results), strict=True):
        series = drawn[label]
        assert series["val"][1][-1] == pytest.approx(best.val_loss)
        assert f"{series['val'][1][-1]:.3f}" == _row(md, best.group)[5]
        assert series["train"][1][-1] == pytest.approx(best.train_loss())  # no lag: the table's mean
        assert series["train"][0][-1] == best.train[-1]["train/tokens"] / 1e3  # through the last record
        assert series["recall"] == ([4, 16], [best.probe["K=4"]["acc"], best.probe["K=16"]["acc"]])
