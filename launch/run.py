"""Start `train` on one or many nodes: `python -m launch.run [options] -- [Hydra overrides]`.

    python -m launch.run --hostfile hosts --launcher deepspeed -- model=bench        # deepspeed runner + pdsh
    python -m launch.run --hostfile hosts --launcher deepspeed --ds-launcher openmpi -- model=bench
    python -m launch.run --hostfile hosts --launcher torchrun -- model=bench         # one torchrun per node (ssh)
    python -m launch.run --nodes 2 --gpus-per-node 8 --launcher slurm --partition gpu -- model=bench  # sbatch
    python -m launch.run --gpus-per-node 2 --launcher deepspeed --dry-run -- trainer.max_steps=10     # localhost

Without --hostfile the job runs on this machine (--gpus-per-node processes). --dry-run prints the files it
would write and the commands it would run. The repository and the Python environment must be at the same
path on every node (a shared filesystem), as the deepspeed runner and torchrun both assume.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from train import outcome

from .commands import (
    LAUNCHERS,
    LaunchError,
    LaunchSpec,
    deepspeed_command,
    deepspeed_env,
    deepspeed_exports,
    env_file_text,
    parse_env,
    torchrun_commands,
)
from .hostfile import Host, HostfileError, read_hostfile
from .slurm import add_slurm_args, render_sbatch, slurm_options


@dataclass
class Plan:
    """What a launch does: files to write, then processes to start together (and wait for)."""

    cwd: str
    files: dict[Path, str] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)  # to create (Slurm's log folder: sbatch does not)
    procs: list[tuple[str, list[str], dict[str, str | None]]] = field(
        default_factory=list
    )  # (what, argv, env changes: a value, or None to remove the variable)

    def describe(self) -> str:
        out = []
        for path, text in self.files.items():
            out.append(f"# file {path}\n{text.rstrip()}")
        for what, argv, env in self.procs:
            unset = [f"-u {k}" for k, v in sorted(env.items()) if v is None]
            sets = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if v is not None]
            prefix = " ".join(["env", *unset] * bool(unset) + sets)
            out.append(f"# {what}\n{prefix + ' ' if prefix else ''}{shlex.join(argv)}")
        return "\n\n".join(out) + "\n"


def child_env(changes: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in {**os.environ, **changes}.items() if v is not None}


def make_plan(
    spec: LaunchSpec,
    launcher: str,
    launch_dir: Path,
    hostfile: Path | None,
    slurm_args: argparse.Namespace | None = None,
    environ: dict[str, str] | None = None,
) -> Plan:
    plan = Plan(cwd=spec.workdir)
    if launcher == "deepspeed":
        if hostfile is None:
            hostfile = launch_dir / "hostfile"
            plan.files[hostfile] = "".join(h.line() + "\n" for h in spec.hosts)
        env_file = launch_dir / "ds_env"
        backend = spec.ds_launcher if spec.nodes > 1 else "pdsh"  # one node: the runner exports nothing
        plan.files[env_file] = env_file_text(deepspeed_exports(spec, environ), backend)
        plan.procs.append(
            (
                "deepspeed runner (starts every node)",
                deepspeed_command(spec, hostfile),
                deepspeed_env(spec, env_file, environ),
            )
        )
    elif launcher == "torchrun":
        for i, node in enumerate(torchrun_commands(spec, environ)):
            plan.procs.append((f"node {i}: {node.host}", node.ssh(spec.workdir), {}))
    elif launcher == "slurm":
        gpus = {h.slots for h in spec.hosts}
        if len(gpus) > 1:
            raise LaunchError("Slurm gives every node the same GPUs; the hostfile has different slot counts")
        opts = slurm_options(slurm_args, spec.nodes, gpus.pop())
        script = launch_dir / f"{opts.job_name}.sbatch"
        plan.files[script] = render_sbatch(spec, opts, environ)
        plan.dirs.append(Path(spec.workdir) / Path(opts.output).parent)
        plan.procs.append(("submit", ["sbatch", str(script)], {}))
    else:
        raise LaunchError(f"--launcher must be one of {LAUNCHERS}, got {launcher!r}")
    return plan


def execute(plan: Plan, timeout: float | None = None, outcome_file: Path | None = None) -> int:
    """Write the files, start every process in its own session, wait. If one fails, stop the others; on
    SIGINT/SIGTERM/SIGUSR1, pass SIGTERM on (train saves a checkpoint and exits). The exit status is the
    ranks' record in `outcome_file` when they wrote one (train/outcome.py): 0 after a handled stop, 2 and
    the cause as the last line after an error; else the first failed process's."""
    for d in plan.dirs:
        d.mkdir(parents=True, exist_ok=True)
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    procs = [
        subprocess.Popen(argv, env=child_env(env), cwd=plan.cwd, start_new_session=True)
        for _, argv, env in plan.procs
    ]

    def stop(sig: int = signal.SIGTERM) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the launcher and the ranks it started (same session)
                except ProcessLookupError:
                    pass

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    old = {s: signal.signal(s, lambda signum, frame: stop()) for s in handled}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                stop()
            if deadline is not None and time.monotonic() > deadline:
                stop(signal.SIGKILL)
                return 124
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    rc = next((p.returncode for p in procs if p.returncode != 0), 0)
    return rc if outcome_file is None else outcome.exit_status(outcome_file, rc, everywhere=True)


def build_spec(a: argparse.Namespace) -> tuple[LaunchSpec, Path | None]:
    if a.hostfile:
        hostfile = Path(a.hostfile).absolute()
        hosts = read_hostfile(hostfile)
        if a.nodes and a.nodes != len(hosts):
            raise LaunchError(f"--nodes {a.nodes} but {hostfile} lists {len(hosts)} hosts")
    else:
        hostfile = None
        gpus = a.gpus_per_node or _local_gpus()
        name = "localhost" if (a.nodes or 1) == 1 else "node"
        if (a.nodes or 1) > 1 and a.launcher != "slurm":
            raise LaunchError("several nodes need a --hostfile (or --launcher slurm, where Slurm picks them)")
        hosts = [Host(f"{name}{i if i else ''}", gpus) for i in range(a.nodes or 1)]
    spec = LaunchSpec(
        hosts=hosts,
        overrides=a.overrides,
        ds_launcher=a.ds_launcher,
        master_addr=a.master_addr,
        master_port=a.master_port,
        env=parse_env(a.env),
        wandb_mode=a.wandb_mode,
    )
    return spec, hostfile


def _local_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    p.add_argument("--hostfile", help="'HOST slots=N' lines; the first host is node 0 and the master")
    p.add_argument("--nodes", type=int, help="with --launcher slurm and no hostfile: nodes to ask for")
    p.add_argument(
        "--gpus-per-node", type=int, help="without a hostfile (default: this machine's GPUs, or 1)"
    )
    p.add_argument(
        "--ds-launcher",
        default="pdsh",
        choices=("pdsh", "openmpi", "mvapich", "slurm"),
        help="the deepspeed runner's --launcher for several nodes",
    )
    p.add_argument("--master-addr", help="default: the first host")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set on every rank (repeatable)")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"))
    p.add_argument(
        "--launch-dir",
        help="where the generated hostfile / env file / script go (default runs/launch/<time>-<pid>)",
    )
    p.add_argument("--timeout", type=float, help="kill the job after this many seconds (tests)")
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    add_slurm_args(p)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for train (after --)")
    return p


def validate_overrides(overrides: list[str]) -> int:
    """Compose and check the overrides as the run would (train/__main__.py): 0, or 2 after one line."""
    from train.__main__ import check_overrides

    try:
        check_overrides(overrides)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        launch_dir = Path(
            a.launch_dir or f"runs/launch/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        ).absolute()
        outcome_file = None if a.launcher == "slurm" else launch_dir / "outcome.json"  # Slurm's: per job
        if outcome_file is not None:
            a.env = [*a.env, f"{outcome.ENV}={outcome_file}"]
        spec, hostfile = build_spec(a)
        plan = make_plan(spec, a.launcher, launch_dir, hostfile, a)
    except (LaunchError, HostfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rc := validate_overrides(a.overrides):
        return rc
    if a.dry_run:
        sys.stdout.write(plan.describe())
        return 0
    print(
        f"launch: {a.launcher}, {spec.nodes} node(s) x {spec.hosts[0].slots}, files in {launch_dir}",
        flush=True,
    )
    try:
        if outcome_file is not None:
            outcome_file.unlink(missing_ok=True)
        return execute(plan, a.timeout, outcome_file)
    except FileNotFoundError as e:  # pdsh, ssh or sbatch missing on this machine
        print(f"error: {e.filename} not found: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
