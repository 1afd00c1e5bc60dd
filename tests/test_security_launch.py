"""Issue 17, launch environments: env names and values cannot run code on a node, secrets are not written.

pdsh and ssh are stand-ins on PATH that do what the real ones do with a command line: join the words with
spaces and hand the string to a shell (`sh -c`, with a bare environment, as on another node). The one
change they make is to run `record.py` instead of the remote Python, which writes what arrived (its
environment and arguments) to a JSON file instead of starting training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import run as launch_run
from launch.commands import LaunchError, LaunchSpec, deepspeed_env, launch_env, torchrun_commands
from launch.hostfile import parse_hostfile
from launch.slurm import SlurmOptions, render_sbatch

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
HOSTS = parse_hostfile("node-a slots=1\nnode-b slots=1\n")
TRICKY = {  # values a shell would run or mangle if they were not escaped for it
    "HF_X": "$(touch {m})",
    "WANDB_NOTES": "fix `touch {m}` now",
    "NCCL_Q": 'it\'s "quoted" \\ back',
    "TORCH_DISTRIBUTED_X": "a;touch {m};b",
}

RECORD = """import json, os, sys
rank = next((a.split("=", 1)[1] for a in sys.argv if a.startswith(("--node_rank=", "--node-rank="))), "x")
with open(os.path.join({out!r}, f"node{{rank}}-{{os.getpid()}}.json"), "w") as f:
    json.dump({{"env": dict(os.environ), "argv": sys.argv[1:]}}, f)
"""
STAND_IN = """import os, subprocess, sys
args = sys.argv[1:]
{pick}
bare = {{"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}}
for n, host in enumerate(hosts):
    line = " ".join(words).replace("%n", str(n)).replace({python!r}, {record!r})
    rc = subprocess.call(["sh", "-c", line], env=bare)
    if rc:
        sys.exit(rc)
"""
PDSH = 'i = args.index("-w"); hosts, words = args[i + 1].split(","), args[i + 2 :]'
SSH = "while args[0] == '-o': args = args[2:]\nhosts, words = [args[0]], args[1:]"


@pytest.fixture
def nodes(tmp_path) -> dict:
    """PATH with the pdsh and ssh stand-ins, the record script, where records go, the marker file."""
    out, bin_ = tmp_path / "arrived", tmp_path / "bin"
    out.mkdir()
    bin_.mkdir()
    record = bin_ / "record.py"
    record.write_text(f"#!{sys.executable}\n" + RECORD.format(out=str(out)))
    for name, pick in (("pdsh", PDSH), ("ssh", SSH)):
        code = STAND_IN.format(pick=pick, python=sys.executable, record=f"{sys.executable} {record}")
        (bin_ / name).write_text(f"#!{sys.executable}\n{code}")
    for f in bin_.iterdir():
        f.chmod(0o755)
    marker = tmp_path / "PWNED"
    env = {k: v for k, v in os.environ.items() if k.startswith(("HOME", "LANG"))}
    env["PATH"] = f"{bin_}:{os.environ['PATH']}"
    tricky = {k: v.format(m=marker) for k, v in TRICKY.items()}
    return {"out": out, "marker": marker, "env": env, "tricky": tricky, "record": str(record)}


def arrived(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def test_deepspeed_pdsh_delivers_values_literally_and_hides_secrets(nodes, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {**nodes["env"], "MLFLOW_TRACKING_PASSWORD": "hunter2", "WANDB_API_KEY": "k-123"}
    args = [f"--env={k}={v}" for k, v in nodes["tricky"].items()]
    cmd = [sys.executable, "-m", "launch.run", "--hostfile", str(hostfile), "--launcher", "deepspeed",
           "--master-addr", "10.0.0.1", "--launch-dir", str(tmp_path / "launch"), *args, "--",
           "run_name=x", "model.layer_pattern=M*M"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    got = arrived(nodes["out"])
    assert len(got) == 2 and not nodes["marker"].exists()
    for node in got:
        assert {k: node["env"].get(k) for k in nodes["tricky"]} == nodes["tricky"]
        assert node["argv"][-2:] == ["run_name=x", "model.layer_pattern=M*M"]
        assert "MLFLOW_TRACKING_PASSWORD" not in node["env"] and "WANDB_API_KEY" not in node["env"]
    assert "cmd = pdsh" in log  # the runner logs its whole command line: no secret in it
    files = "".join(f.read_text() for f in (tmp_path / "launch").iterdir())
    for secret in ("hunter2", "k-123"):
        assert secret not in log and secret not in files


def test_torchrun_ssh_line_delivers_values_literally(nodes):
    s = LaunchSpec(hosts=HOSTS, overrides=["model.layer_pattern=M*M"], env=nodes["tricky"], workdir=str(ROOT))
    for node in torchrun_commands(s, {}):
        p = subprocess.run(node.ssh(str(ROOT)), env=nodes["env"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
    got = arrived(nodes["out"])
    assert len(got) == 2 and not nodes["marker"].exists()
    for node in got:
        assert {k: node["env"].get(k) for k in nodes["tricky"]} == nodes["tricky"]
        assert node["argv"][-1] == "model.layer_pattern=M*M"


@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_sbatch_script_delivers_values_literally(nodes, tmp_path, mode):
    (Path(nodes["out"]).parent / "bin" / "scontrol").write_text("#!/bin/sh\necho node-a\n")
    (Path(nodes["out"]).parent / "bin" / "srun").write_text(
        '#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    for f in ("scontrol", "srun"):
        (Path(nodes["out"]).parent / "bin" / f).chmod(0o755)
    s = LaunchSpec(hosts=HOSTS, env=nodes["tricky"], python=nodes["record"], workdir=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(s, SlurmOptions(nodes=1, gpus_per_node=1, mode=mode), {}))
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node-a", "SLURM_NNODES": "1"}
    p = subprocess.run(["bash", str(script)], env={**nodes["env"], **slurm}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (got,) = [r for r in arrived(nodes["out"]) if "train.outcome" not in r["argv"]]  # the script's last word
    assert {k: got["env"].get(k) for k in nodes["tricky"]} == nodes["tricky"]
    assert not nodes["marker"].exists()
    if mode == "deepspeed":  # the env file the runner exports to the other nodes: escaped for its pdsh line
        text = (tmp_path / "runs/slurm/launch-7/ds_env").read_text()
        assert "HF_X=\\$(touch" in text and text.endswith("MASTER_PORT=29500\n")


@pytest.mark.parametrize(
    "item, error",
    [
        ("X;touch {m};Y=1", "a variable name must be letters, digits and '_'"),
        ("X=a\nEOF\ntouch {m}\ncat <<EOF", "the value holds a line break"),
        ("WANDB_API_KEY=k-123", "looks like a secret"),
        ("HF_TOKEN=k-123", "looks like a secret"),
    ],
)
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "slurm"])
def test_bad_env_items_are_refused_before_anything_is_written(nodes, tmp_path, capsys, item, error, launcher):
    item = item.format(m=nodes["marker"])
    argv = [
        "--launcher",
        launcher,
        "--launch-dir",
        str(tmp_path / "l"),
        "--env",
        item,
        "--dry-run",
        "--",
        "a=1",
    ]
    assert launch_run.main(argv) == 2
    out = capsys.readouterr()
    assert error in out.err and "k-123" not in out.out + out.err
    assert not (tmp_path / "l").exists() and not nodes["marker"].exists()


def test_caller_secrets_are_not_passed_on_and_removed_from_the_deepspeed_runner():
    caller = {"MLFLOW_TRACKING_PASSWORD": "p", "NCCL_TOKEN": "t", "WANDB_API_KEY": "k", "NCCL_IB_PKEY": "0x1"}
    s = LaunchSpec(hosts=HOSTS)
    assert launch_env(s, caller).get("NCCL_IB_PKEY") == "0x1"  # a partition key, not a secret
    assert not {"MLFLOW_TRACKING_PASSWORD", "NCCL_TOKEN", "WANDB_API_KEY"} & set(launch_env(s, caller))
    changes = deepspeed_env(s, "/tmp/ds_env", caller)
    assert changes["MLFLOW_TRACKING_PASSWORD"] is None and changes["NCCL_TOKEN"] is None  # unset for it
    assert "WANDB_API_KEY" not in changes  # not one it copies: it stays for processes on this machine
    assert (
        "env -u MLFLOW_TRACKING_PASSWORD -u NCCL_TOKEN "
        in launch_run.Plan(".", procs=[("r", ["x"], changes)]).describe()
    )
    with pytest.raises(LaunchError, match="looks like a secret"):
        launch_env(LaunchSpec(hosts=HOSTS, env={"AWS_SECRET_ACCESS_KEY": "s"}), {})


@pytest.mark.parametrize("backend", ["openmpi", "slurm"])
def test_deepspeed_backends_without_a_shell_refuse_values_they_would_mangle(backend, tmp_path):
    s = LaunchSpec(
        hosts=HOSTS,
        ds_launcher=backend,
        env={"NCCL_X": "a,LD_PRELOAD=/tmp/x.so" if backend == "slurm" else "a b"},
    )
    with pytest.raises(LaunchError, match=f"deepspeed runner's {backend} backend"):
        launch_run.make_plan(s, "deepspeed", tmp_path, None, environ={})


def test_sbatch_options_cannot_add_lines():
    with pytest.raises(LaunchError, match="a line break ends the #SBATCH line"):
        SlurmOptions(job_name="x\ntouch /tmp/PWNED")


def test_hostnames_cannot_be_ssh_options():
    from launch.hostfile import HostfileError

    with pytest.raises(HostfileError):
        parse_hostfile("-oProxyCommand slots=1\n")


@pytest.mark.parametrize(
    "args, error",
    [
        (["--", "+hydra.callbacks.x._target_=os.system"], "the sweep passes no hydra.* overrides"),
        (["--", "hydra/job_logging=disabled"], "the sweep passes no hydra.* overrides"),
        (["--axis", "hydra.job.chdir=true,false"], "--axis wants KEY=V1,V2 for a key the sweep does not set"),
        (["--axis", "data.seed=1,../../../outside"], "variant name 'mamba-dense-seed-../../../outside'"),
        (["--name", ".."], "--name '..': letters, digits"),
    ],
)
def test_sweep_refuses_hydra_extras_and_names_that_leave_its_directory(tmp_path, capsys, args, error):
    from launch.sweep import main as sweep_main

    argv = ["--root", str(tmp_path / "runs"), "--ratios", "mamba", "--moe", "off", "--dry-run", *args]
    assert sweep_main(argv) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside").exists()
