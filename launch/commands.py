"""Command lines and environment for every way of starting `train`, from one `LaunchSpec`.

The same spec gives the deepspeed runner command (one process on the first node starts all the others
through pdsh / openmpi / mvapich / slurm), one torchrun command per node, or an srun line for a Slurm
batch script (launch/slurm.py). Pure functions: nothing here starts a process (launch/run.py does), so
tests check the exact command lines of a 2-node x 8-GPU job on a laptop.

Environment, the same for every launcher: `launch_env` = defaults (NCCL_NVLS_ENABLE=0, ...) + the
caller's NCCL_* / WANDB_* / TORCH_* / ... variables + `--env K=V`. Remote nodes get it through the
deepspeed runner's env file (DS_ENV_FILE), `env K=V` in the ssh command, or srun's --export=ALL.
Names must be identifiers and values one line; each value is escaped for every shell it crosses (the env
file under the runner's pdsh wrapping, the ssh line, the batch script). Variables that look like secrets
(`*_KEY`, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`) are never written to files or command lines, nor printed:
`--env` refuses them, the caller's copies are not passed on, and the deepspeed runner of a multi-node job
does not see those it would copy into its pdsh command line (MLFLOW_*, NCCL_*, ...). Processes on this
machine and Slurm jobs inherit them from the launching environment; nodes reached over ssh/pdsh
authenticate on their own (`wandb login` writes ~/.netrc).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .hostfile import Host, is_local, uniform_slots

LAUNCHERS = ("deepspeed", "torchrun", "slurm")
DS_LAUNCHERS = (
    "pdsh",
    "openmpi",
    "mvapich",
    "slurm",
)  # the deepspeed runner's --launcher backends we support
WANDB_MODES = ("online", "offline", "disabled")
ENTRY = "launch/entry.py"  # the script the deepspeed runner starts (see launch/entry.py for why not -m)

# Set unless the caller's environment or --env says otherwise.
DEFAULT_ENV = {
    # NVLink SHARP (multicast) all-reduce needs fabric-manager/IMEX support that containers and many
    # clusters lack: NCCL then fails at init or hangs. Opt back in with --env NCCL_NVLS_ENABLE=1.
    "NCCL_NVLS_ENABLE": "0",
    "PYTHONUNBUFFERED": "1",  # log lines from every node arrive as they happen
    "HYDRA_FULL_ERROR": "1",  # a config error on node 3 shows its full message, not "set HYDRA_FULL_ERROR"
}
# Copied from the caller's environment to every rank.
PASS_PREFIXES = (
    "NCCL_",
    "WANDB_",
    "TORCH_NCCL_",
    "TORCH_DISTRIBUTED_",
    "UCX_",
    "FI_",
    "HF_",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "HYDRA_FULL_ERROR",
)
_SECRET = re.compile(
    r"(?:^|_)(?:(?:API)?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:_|$)", re.IGNORECASE
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NAME = re.compile(r"[A-Za-z0-9._-]+")  # a run, sweep or variant name: one directory, never `.` or `..`
# Prefixes of the variables the deepspeed runner copies from its own environment into every node's exports
# (deepspeed.launcher.runner EXPORT_ENVS + the CUDA accelerator's), and the characters it leaves unquoted.
DS_COPIED = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
_DS_PLAIN = re.compile(r"[\w@%+=:,./-]*")


class LaunchError(ValueError):
    """A launch that cannot work as asked; the message says what to change."""


@dataclass
class LaunchSpec:
    hosts: list[Host]  # from a hostfile, or [Host("localhost", n)]
    overrides: list[str] = field(default_factory=list)  # Hydra overrides for train, in order
    ds_launcher: str = "pdsh"
    master_addr: str | None = None  # default: the first host (127.0.0.1 when it is this machine)
    master_port: int = 29500
    env: dict[str, str] = field(default_factory=dict)  # --env K=V, over everything else
    wandb_mode: str | None = None  # online | offline | disabled; None: the config's (offline by default)
    python: str = sys.executable  # the same path must exist on every node (a shared venv)
    workdir: str = field(default_factory=os.getcwd)  # the repository, at the same path on every node

    def __post_init__(self) -> None:
        if not self.hosts:
            raise LaunchError("no hosts")
        if self.ds_launcher not in DS_LAUNCHERS:
            raise LaunchError(f"--ds-launcher must be one of {DS_LAUNCHERS}, got {self.ds_launcher!r}")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise LaunchError(f"--wandb-mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"--master-port must be in 1..65535, got {self.master_port}")
        for o in self.overrides:
            if o.startswith("-"):
                raise LaunchError(f"{o!r} is not a Hydra override; launcher options go before '--'")

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def master(self) -> str:
        if self.master_addr:
            return self.master_addr
        first = self.hosts[0].name
        return "127.0.0.1" if is_local(first) else first

    @property
    def train_args(self) -> list[str]:
        """The Hydra overrides every rank gets; --wandb-mode becomes logging.wandb.mode (the config is what
        train reads; WANDB_MODE is set too, for anything else that starts wandb)."""
        extra = [f"logging.wandb.mode={self.wandb_mode}"] if self.wandb_mode else []
        return [*self.overrides, *extra]


def check_name(what: str, name: str) -> str:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise LaunchError(f"{what} {name[:100]!r}: letters, digits, '.', '-', '_' only (and not . or ..)")
    return name


def is_secret(name: str) -> bool:
    """WANDB_API_KEY, HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ... (not NCCL_IB_PKEY)."""
    return bool(_SECRET.search(name))


def check_env(env: dict[str, str], what: str = "--env") -> None:
    """Names that every shell reads as one name, values on one line; no secrets (see the module doc)."""
    for k, v in env.items():
        if not _ENV_NAME.fullmatch(k):
            raise LaunchError(f"{what} {k[:100]!r}: a variable name must be letters, digits and '_'")
        if any(c in v for c in "\n\r\0"):
            raise LaunchError(f"{what} {k}: the value holds a line break or NUL; values must be one line")
        if is_secret(k):
            raise LaunchError(
                f"{what} {k}: looks like a secret, and secrets are never written to launch files or command "
                f"lines; export {k} in the environment of this command instead (docs/launch.md, Secrets)"
            )


def launch_env(spec: LaunchSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables every rank must see (not the whole environment: what is exported to other nodes)."""
    environ = dict(os.environ if environ is None else environ)
    out = dict(DEFAULT_ENV)
    passed = {k: v for k, v in environ.items() if k.startswith(PASS_PREFIXES) and not is_secret(k)}
    check_env(passed, "the environment variable")
    out.update(passed)
    if spec.wandb_mode:
        out["WANDB_MODE"] = spec.wandb_mode
    check_env(spec.env)
    out.update(spec.env)
    return out


def parse_env(items: list[str]) -> dict[str, str]:
    """--env K=V items."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise LaunchError(f"--env wants KEY=VALUE, got {item!r}")
        out[k] = v
    check_env(out)
    return out


def env_file_text(env: dict[str, str], ds_launcher: str = "pdsh") -> str:
    r"""The deepspeed runner's env-file format (`.deepspeed_env`): KEY=VALUE lines, exported on every node.

    The runner strips each value and wraps one holding anything but `[\w@%+=:,./-]` in double quotes;
    pdsh then hands `export K="V"; ...` to a shell on every node. So for pdsh, backslash, `$`, backtick
    and `"` are escaped (inside double quotes they would expand); the other backends pass the value as an
    argument, where the quotes would stay in it: they get plain values only (srun --export splits at commas)."""
    check_env(env, "cannot export")
    lines = []
    for k, v in sorted(env.items()):
        if v != v.strip():
            raise LaunchError(f"cannot export {k}: the deepspeed runner strips the spaces around {v!r}")
        if ds_launcher == "pdsh":
            v = re.sub(r'([\\$`"])', r"\\\1", v)
        elif not _DS_PLAIN.fullmatch(v) or (ds_launcher == "slurm" and "," in v):
            raise LaunchError(
                f"cannot export {k}={v!r} through the deepspeed runner's {ds_launcher} backend, which would "
                f"pass it {'split at commas' if _DS_PLAIN.fullmatch(v) else 'wrapped in quotes'}; use "
                f"--ds-launcher pdsh or --launcher torchrun, or set it in the environment on the nodes"
            )
        lines.append(f"{k}={v}\n")
    return "".join(lines)


# ---- the deepspeed runner --------------------------------------------------------------------------------
def deepspeed_command(spec: LaunchSpec, hostfile: str | Path) -> list[str]:
    """`deepspeed --hostfile H ... launch/entry.py overrides`, run on the first node. Its env must hold
    DS_ENV_FILE (see `deepspeed_env`). The master address is always given, so the runner never asks the
    first host for `hostname -I` over ssh; one node needs no ssh at all (--no_ssh_check)."""
    cmd = [
        spec.python,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        spec.master,
        "--master_port",
        str(spec.master_port),
    ]
    if spec.nodes > 1:
        if spec.ds_launcher in ("slurm", "openmpi", "mvapich") and len({h.slots for h in spec.hosts}) > 1:
            uniform_slots(spec.hosts, f"deepspeed --launcher {spec.ds_launcher}")
        cmd += ["--launcher", spec.ds_launcher]
        if spec.ds_launcher == "slurm":  # srun starts the ranks: no ssh, which Slurm clusters often forbid
            cmd.append("--no_ssh_check")
    else:
        cmd += ["--no_ssh_check"]
    args = spec.train_args
    if spec.nodes > 1 and spec.ds_launcher == "pdsh":
        args = [_pdsh_quote(a) for a in args]
    return [*cmd, ENTRY, *args]


def _pdsh_quote(arg: str) -> str:
    """pdsh hands the command to a remote shell as one string, and the runner only wraps arguments that
    hold a space in double quotes: quote the rest ourselves, or `${model.preset}` or `M*M` would be
    expanded there."""
    if " " in arg:  # the runner will write "arg": only $, ` and \ are special inside double quotes
        return arg.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")
    return shlex.quote(arg)


def deepspeed_env(
    spec: LaunchSpec, env_file: str | Path, environ: dict[str, str] | None = None
) -> dict[str, str | None]:
    """Changes to the deepspeed runner process's environment: the launch env, DS_ENV_FILE naming the file
    it exports to the other nodes (write `env_file_text(launch_env(spec) + master)` there), and None (to
    remove) for each secret-looking variable a multi-node runner would copy into its logged pdsh command."""
    environ = dict(os.environ if environ is None else environ)
    drop = {k: None for k in environ if spec.nodes > 1 and k.startswith(DS_COPIED) and is_secret(k)}
    return {**drop, **launch_env(spec, environ), "DS_ENV_FILE": str(Path(env_file).absolute())}


def deepspeed_exports(spec: LaunchSpec, environ: dict[str, str] | None = None) -> dict[str, str]:
    """What the env file holds: the launch env and the master (mpirun / srun backends do not pass it)."""
    return {**launch_env(spec, environ), "MASTER_ADDR": spec.master, "MASTER_PORT": str(spec.master_port)}


# ---- torchrun ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeCommand:
    host: str
    argv: list[str]
    env: dict[str, str]  # to add to the node's environment

    def shell(self, workdir: str) -> str:
        """One line for a shell on `host`: cd, environment, command."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if not is_secret(k))
        return f"cd {shlex.quote(workdir)} && env {env} {shlex.join(self.argv)}"

    def ssh(self, workdir: str) -> list[str]:
        """The command run from the launching machine: directly on this machine, else over ssh."""
        if is_local(self.host):
            return ["bash", "-c", self.shell(workdir)]
        return ["ssh", "-o", "BatchMode=yes", self.host, self.shell(workdir)]


def torchrun_commands(spec: LaunchSpec, environ: dict[str, str] | None = None) -> list[NodeCommand]:
    """One torchrun per node with a static node rank (the hostfile's order); one node: --standalone."""
    gpus = uniform_slots(spec.hosts, "torchrun")
    env = launch_env(spec, environ)
    run = [spec.python, "-m", "launch.torchrun", f"--nproc_per_node={gpus}"]
    tail = ["-m", "train", *spec.train_args]
    if spec.nodes == 1:
        return [NodeCommand(spec.hosts[0].name, [*run, "--standalone", *tail], env)]
    return [
        NodeCommand(
            h.name,
            [
                *run,
                f"--nnodes={spec.nodes}",
                f"--node_rank={i}",
                f"--master_addr={spec.master}",
                f"--master_port={spec.master_port}",
                *tail,
            ],
            env,
        )
        for i, h in enumerate(spec.hosts)
    ]


def srun_torchrun_command(spec: LaunchSpec, gpus_per_node: int) -> list[str]:
    """For a Slurm batch script: one torchrun task per node meeting at a c10d rendezvous on the first node
    (shell variables are expanded by the batch script; srun's --export=ALL passes the environment)."""
    return [
        "srun",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=1",
        spec.python,
        "-m",
        "launch.torchrun",
        "--nnodes=$SLURM_NNODES",
        f"--nproc_per_node={gpus_per_node}",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT",
        "--rdzv_id=$SLURM_JOB_ID",
        "-m",
        "train",
        *spec.train_args,
    ]


def local_command(nproc: int, overrides: list[str], python: str = sys.executable) -> list[str]:
    """One machine without a hostfile: `python -m train`, or torchrun --standalone for several processes."""
    if nproc <= 1:
        return [python, "-m", "train", *overrides]
    return [
        python,
        "-m",
        "launch.torchrun",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train",
        *overrides,
    ]


def shell_join(argv: list[str]) -> str:
    """Quote for a shell, but leave $VARS (a batch script's) expandable; Hydra's ${...} stays quoted."""
    return " ".join(a if re.fullmatch(r"[\w@%+=:,./$\-]*", a) else shlex.quote(a) for a in argv)
