"""Attention:Mamba ratio x MoE ablation: `python -m launch.sweep --name NAME [options] [-- overrides]`.

    python -m launch.sweep --name ratio --preset debug --steps 120 --nproc 2      # 8 runs, one after another
    python -m launch.sweep --name ratio --ratios 1:7,mamba --moe on --axis model.use_rope=false,true
    python -m launch.sweep --sweep mqar --mixers mamba,mamba2   # Mamba-1 vs Mamba-2 hybrids, same width/depth
    python -m launch.sweep --name r13b --preset ablation-1.3b --steps 20000 --slurm --gpus-per-node 8 \\
        --partition gpu -- data.path=/data/pile-tok     # one Slurm job per run
    python -m launch.sweep --sweep mqar        # a named sweep (launch/sweep_presets.py): MQAR recall, one GPU
    python -m launch.report runs/sweep-ratio -o runs/sweep-ratio/report.md --plot runs/sweep-ratio/loss.png

Every variant is the preset with one layout written as a layer pattern over its num_hidden_layers
('*' attention, 'M' Mamba, 'E' a MoE feed-forward on every other layer, as the paper): attn = all
attention, 1:k = one attention layer per k+1 (at offset (k+1)//2, the paper's 8/4 for 1:7), mamba = no
attention. --mixers picks the non-attention mixer ('M' Mamba-1, 'S' Mamba-2 of jamba/layers.py; the
variant name gains -mamba2). MoE off sets num_experts=1. Everything else (data, order, seeds, steps, batch) is the same.
Runs go to runs/sweep-NAME/VARIANT with their own checkpoints, named NAME-VARIANT in W&B group NAME.

Rerunning the same command skips runs whose newest checkpoint is at --steps, resumes interrupted ones
(train's resume=auto) and starts the rest. Runs are subprocesses, not a Hydra multirun, because the skip
and resume decisions must be taken before a run starts, a run with several ranks (torchrun) cannot be a
job inside one Python process, train/ holds process-wide state (process group, DeepSpeed, W&B), a failed
variant must not stop the others, and on Slurm each run becomes an ordinary batch job from the same
template as any other launch (launch/slurm.py) instead of depending on the submitit plugin. Each run is
still one Hydra job: its .hydra/overrides.yaml replays it with `python -m train <overrides>`.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .commands import LaunchError, LaunchSpec, check_name
from .hostfile import Host
from .sweep_presets import RATIOS, SWEEPS
from .sweep_run import TIMED_OUT, Variant, run_local  # noqa: F401 - TIMED_OUT: part of this module's interface

# Keys the sweep sets for each run; an extra override of one of them would silently break the comparison.
OWNED = (
    "model",
    "model.layer_pattern",
    "model.num_experts",
    "model.attn_layer_period",
    "model.attn_layer_offset",
    "model.expert_layer_period",
    "model.expert_layer_offset",
    "run_name",
    "run_dir",
    "trainer.max_steps",
    "logging.wandb.group",
    "resume",
)


def ratio_label(ratio: str) -> str:
    return ratio.replace(":", "to")


def recurrent_mixers() -> dict[str, str]:
    """Mixer name -> pattern symbol of the mixers a ratio can pair with attention (jamba/layers.py)."""
    from jamba.layers import ATTENTION, MIXERS

    return {m.name: s for s, m in MIXERS.items() if s != ATTENTION}


def layer_pattern(num_layers: int, ratio: str, moe: bool, mixer: str = "mamba") -> str:
    """'attn', 'mamba' (no attention) or '1:k' over num_layers, the non-attention layers `mixer`; 'E' on odd
    layers when moe (period 2, offset 1). One generator: jamba's pattern_from_periods."""
    from jamba import pattern_from_periods

    symbols = recurrent_mixers()
    if mixer not in symbols:
        raise LaunchError(f"mixer {mixer!r}: choose from {', '.join(symbols)}")
    if ratio == "attn":
        period, offset = 1, 0
    elif ratio == "mamba":
        period, offset = num_layers + 1, num_layers  # attention never
    else:
        m = re.fullmatch(r"1:(\d+)", ratio)
        if m is None or int(m.group(1)) < 1:
            raise LaunchError(
                f"ratio {ratio!r}: use attn, mamba or 1:k (one attention layer per k Mamba layers)"
            )
        period = int(m.group(1)) + 1
        if period > num_layers:
            raise LaunchError(f"ratio {ratio} needs at least {period} layers, the model has {num_layers}")
        offset = period // 2
    return pattern_from_periods(num_layers, period, offset, 2, 1, moe=moe, mixer=symbols[mixer])


def variant_name(ratio: str, moe: bool, mixer: str, axes: list[tuple[str, str]]) -> str:
    """RATIO-MOE[-MIXER][-KEY-VALUE...]: the mixer only when not Mamba-1, so earlier sweeps keep their names."""
    parts = [ratio_label(ratio), "moe" if moe else "dense", *([mixer] if mixer != "mamba" else [])]
    return "-".join([*parts, *(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in axes)])


def compose(*override_lists: list[str]) -> list:
    """The validated train Config of each override list (typos fail here, before any run starts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from train.config import register, to_config

    register()
    with initialize_config_module(config_module="conf", version_base=None):
        return [to_config(hydra_compose(config_name="config", overrides=o)) for o in override_lists]


def run_status(checkpoint_dir: str | Path, max_steps: int) -> tuple[str, int]:
    """('done' | 'partial' | 'new', step of the newest complete checkpoint)."""
    from train.checkpoint_layout import find_latest, read_state

    ckpt = find_latest(checkpoint_dir)
    if ckpt is None:
        return "new", 0
    step = int(read_state(ckpt)["step"])
    return ("done" if step >= max_steps else "partial"), step


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_hydra(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def plan_variants(a: argparse.Namespace) -> list[Variant]:
    for o in a.overrides:
        if _is_hydra(_key(o)):  # hydra.callbacks, hydra.job.env_set, ... run code or redirect outputs
            raise LaunchError(
                f"{o!r}: the sweep passes no hydra.* overrides to its runs (they can run code at start-up); "
                f"put Hydra settings in a config file of your own"
            )
        if _key(o) in OWNED:
            raise LaunchError(
                f"{o!r}: the sweep sets {_key(o)} for every run (use --preset, --steps, --name, "
                f"--ratios, --mixers, --moe)"
            )
    base = [f"model={a.preset}", *([f"+experiment={a.experiment}"] if a.experiment else []), *a.overrides]
    model = compose(base)[0].model
    from train.config import build_model_config

    mcfg = build_model_config(model)
    experts = a.experts or (mcfg.num_experts if mcfg.num_experts > 1 else 16)
    axes = [(k, vs.split(",")) for k, _, vs in (ax.partition("=") for ax in a.axis)]
    for k, vs in axes:
        if not k or not all(vs) or _key(k) in OWNED or _is_hydra(_key(k)):
            raise LaunchError(
                f"--axis wants KEY=V1,V2 for a key the sweep does not set, got {k}={','.join(vs)}"
            )
    variants = []
    for ratio, moe, mixer, *values in itertools.product(a.ratios, a.moe, a.mixers, *[vs for _, vs in axes]):
        if ratio == "attn" and mixer != a.mixers[0]:
            continue  # all attention: the same run whatever the recurrent mixer
        named = [(k, v) for (k, _), v in zip(axes, values, strict=True)]
        name = variant_name(ratio, moe, "mamba" if ratio == "attn" else mixer, named)
        check_name("variant name", name)  # one directory under the sweep (an --axis value is in it)
        run_dir = Path(a.root) / f"sweep-{a.name}" / name
        pattern = layer_pattern(mcfg.num_hidden_layers, ratio, moe, mixer)
        layout = [f"model.layer_pattern={pattern}", f"model.num_experts={experts if moe else 1}"]
        if moe and mcfg.num_experts_per_tok < 2 and "model.num_experts_per_tok" not in map(_key, a.overrides):
            layout.append("model.num_experts_per_tok=2")  # a dense preset turned MoE: the paper's top-2
        tags = ",".join([f"sweep-{a.name}", f"ratio-{ratio_label(ratio)}", "moe" if moe else "dense", mixer])
        overrides = [
            *base,
            *layout,
            *(f"{k}={v}" for (k, _), v in zip(axes, values, strict=True)),
            f"trainer.max_steps={a.steps}",
            f"run_name={a.name}-{name}",
            f"run_dir={run_dir}",
            f"logging.wandb.group={a.name}",
            f"logging.wandb.tags=[{tags}]",
            "resume=auto",
        ]
        variants.append(Variant(name, ratio, moe, pattern, overrides, run_dir, mixer=mixer))
    for v, cfg in zip(variants, compose(*(v.overrides for v in variants)), strict=True):
        v.status, v.step = run_status(cfg.checkpoint.dir, a.steps)
    return variants


def write_manifest(a: argparse.Namespace, variants: list[Variant]) -> Path:
    """runs/sweep-NAME/sweep.json: this invocation's plan; variants of earlier invocations that this one
    left out (a subset via --ratios / --moe) stay listed, so the report still finds them."""
    path = Path(a.root) / f"sweep-{a.name}" / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    listed = {v["name"]: v for v in json.loads(path.read_text())["variants"]} if path.is_file() else {}
    listed.update(
        {
            v.name: {
                "name": v.name,
                "ratio": v.ratio,
                "moe": v.moe,
                "mixer": v.mixer,
                "layer_pattern": v.pattern,
                "run_dir": str(v.run_dir),
                "overrides": v.overrides,
            }
            for v in variants
        }
    )
    path.write_text(
        json.dumps(
            {
                "name": a.name,
                "sweep": a.sweep,
                "preset": a.preset,
                "steps": a.steps,
                "nproc": a.nproc,
                "experiment": a.experiment,
                "extra_overrides": a.overrides,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "variants": list(listed.values()),
            },
            indent=1,
        )
    )
    return path


def run_slurm(a: argparse.Namespace, variants: list[Variant]) -> None:
    """One batch job per run that is not done (and not already queued under its name)."""
    from .slurm import SlurmOptions, render_sbatch, write_and_submit

    queued = set()
    if shutil.which("squeue") and not a.dry_run:
        out = subprocess.run(["squeue", "--me", "-h", "-o", "%j"], capture_output=True, text=True).stdout
        queued = set(out.split())
    for i, v in enumerate(variants):
        job = f"{a.name}-{v.name}"
        if v.status == "done" or job in queued:
            print(f"{v.name}: {'done' if v.status == 'done' else 'already queued'}, skipped")
            continue
        # a port per run: single-node jobs of one sweep may share a node
        spec = LaunchSpec(
            hosts=[Host("slurm", a.gpus_per_node)] * a.nodes, overrides=v.overrides, master_port=29500 + i
        )
        opts = SlurmOptions(
            nodes=a.nodes,
            gpus_per_node=a.gpus_per_node,
            job_name=job,
            partition=a.partition,
            account=a.account,
            time=a.time,
            output=f"{v.run_dir}/slurm-%j.out",
        )
        script = render_sbatch(spec, opts)
        job_id = write_and_submit(script, v.run_dir / "job.sbatch", submit=not a.dry_run)
        print(f"{v.name}: {'wrote' if a.dry_run else f'submitted job {job_id},'} {v.run_dir / 'job.sbatch'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sweep",
        choices=sorted(SWEEPS),
        help="a named sweep (launch/sweep_presets.py): its flags and overrides as defaults, its data prepared",
    )
    p.add_argument("--name", default="ratio", help="sweep name: runs/sweep-NAME, W&B group NAME")
    p.add_argument("--preset", default="debug", help="model preset (conf/model/*.yaml)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run (the same for all)")
    p.add_argument("--ratios", type=lambda s: s.split(","), default=list(RATIOS), help="attn,1:3,1:7,mamba")
    p.add_argument(
        "--mixers",
        type=lambda s: s.split(","),
        default=["mamba"],
        help="the recurrent mixer of the hybrids, an axis at equal width and depth: mamba,mamba2 "
        "(jamba/layers.py; 'attn' runs once)",
    )
    p.add_argument(
        "--moe",
        type=lambda s: [{"on": True, "off": False}[x] for x in s.split(",")],
        default=[True, False],
        help="on,off",
    )
    p.add_argument("--experts", type=int, help="experts when MoE is on (default: the preset's, else 16)")
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="another axis of the grid, e.g. model.use_rope=false,true (repeatable)",
    )
    p.add_argument(
        "--experiment",
        help="conf/experiment/ file with the shared settings "
        "(default: ablation-debug for --preset debug, else ablation; '' for none)",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per run on this machine")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time on this machine (small runs sharing one GPU)"
    )
    p.add_argument("--root", default="runs")
    p.add_argument(
        "--timeout", type=float, help="seconds per run; then it is stopped (and resumes next time)"
    )
    p.add_argument(
        "--show-output", action="store_true", help="train's console output here, not in console.log"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (and write Slurm scripts), run nothing"
    )
    g = p.add_argument_group("Slurm (one job per run)")
    g.add_argument("--slurm", action="store_true")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", default="24:00:00")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    named = p.parse_known_args(argv)[0].sweep
    if named:
        p.set_defaults(**SWEEPS[named].defaults)
    a = p.parse_args(argv)
    if named:
        a.overrides = [*SWEEPS[named].overrides, *a.overrides]
    if a.jobs < 1:
        print(f"error: --jobs must be at least 1, got {a.jobs}", file=sys.stderr)
        return 2
    if a.experiment is None:
        a.experiment = "ablation-debug" if a.preset == "debug" else "ablation"
    try:
        check_name("--name", a.name)
        variants = plan_variants(a)
    except Exception as e:  # noqa: BLE001 - LaunchError, ConfigError, Hydra's composition errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = write_manifest(a, variants)
    print(f"sweep {a.name}: {len(variants)} runs x {a.steps} steps, {manifest}")
    for v in variants:
        print(f"  {v.name:<24} {v.pattern:<20} {v.status}{f' (step {v.step})' if v.step else ''}")
    if named and SWEEPS[named].prepare and not a.dry_run:
        from data.prepare import main as prepare

        if rc := prepare(list(SWEEPS[named].prepare)):
            return rc
    if a.slurm:
        run_slurm(a, variants)
        return 0
    if a.dry_run:
        return 0
    with open(manifest.parent / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"error: another sweep is running in {manifest.parent}", file=sys.stderr)
            return 2
        try:
            results = run_local(variants, a.nproc, a.show_output, a.timeout, a.jobs)
        except KeyboardInterrupt:
            print("sweep stopped (its runs saved and stopped); the same command resumes it", file=sys.stderr)
            return 130
    failed = [n for n, rc in results.items() if rc != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (rerun the same command to retry; finished runs are skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
