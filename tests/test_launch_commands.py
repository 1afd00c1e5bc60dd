"""Command lines of a 2-node x 8-GPU job for every launcher, and the environment they pass on."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import run as launch_run
from launch.commands import (
    LaunchError,
    LaunchSpec,
    deepspeed_command,
    deepspeed_env,
    deepspeed_exports,
    env_file_text,
    launch_env,
    srun_torchrun_command,
    torchrun_commands,
)
from launch.entry import torch_env
from launch.hostfile import Host, parse_hostfile
from launch.slurm import SlurmOptions, render_sbatch

PY = "/venv/bin/python"
HOSTS = parse_hostfile("node-001 slots=8\nnode-002 slots=8\n")
CALLER_ENV = {
    "NCCL_IB_HCA": "mlx5",
    "NCCL_DEBUG": "WARN",
    "WANDB_API_KEY": "secret",
    "WANDB_PROJECT": "p",
    "HOME": "/root",
    "PATH": "/bin",
}


def spec(**kw) -> LaunchSpec:
    return LaunchSpec(
        **{
            "hosts": HOSTS,
            "overrides": ["model=bench", "trainer.max_steps=10"],
            "python": PY,
            "workdir": "/repo",
            **kw,
        }
    )


def test_launch_env_defaults_passthrough_and_no_secrets():
    env = launch_env(spec(wandb_mode="offline", env={"NCCL_DEBUG": "INFO"}), CALLER_ENV)
    assert env == {
        "NCCL_NVLS_ENABLE": "0",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
        "NCCL_IB_HCA": "mlx5",
        "NCCL_DEBUG": "INFO",
        "WANDB_PROJECT": "p",
        "WANDB_MODE": "offline",
    }
    assert "WANDB_API_KEY" not in env  # never written to an env file or a command line


def test_deepspeed_pdsh_two_nodes():
    s = spec(wandb_mode="disabled")
    assert deepspeed_command(s, "/repo/hosts") == [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        "/repo/hosts",
        "--master_addr",
        "node-001",
        "--master_port",
        "29500",
        "--launcher",
        "pdsh",
        "launch/entry.py",
        "model=bench",
        "trainer.max_steps=10",
        "logging.wandb.mode=disabled",
    ]
    exports = deepspeed_exports(s, CALLER_ENV)
    assert exports["MASTER_ADDR"] == "node-001" and exports["MASTER_PORT"] == "29500"
    assert exports["NCCL_NVLS_ENABLE"] == "0" and exports["NCCL_IB_HCA"] == "mlx5"
    text = env_file_text(exports)
    assert "NCCL_NVLS_ENABLE=0\n" in text and "secret" not in text
    assert deepspeed_env(s, "/tmp/ds_env", CALLER_ENV)["DS_ENV_FILE"] == "/tmp/ds_env"


@pytest.mark.parametrize("backend", ["openmpi", "mvapich", "slurm"])
def test_deepspeed_other_backends(backend):
    cmd = deepspeed_command(spec(ds_launcher=backend), "h")
    assert cmd[cmd.index("--launcher") + 1] == backend
    with pytest.raises(ValueError, match="same slots on every host"):
        deepspeed_command(spec(ds_launcher=backend, hosts=[Host("a", 8), Host("b", 4)]), "h")


def test_pdsh_arguments_survive_the_remote_shell():
    cmd = deepspeed_command(spec(overrides=["model.layer_pattern=MM*M", "run_dir=runs/${model.preset}"]), "h")
    assert cmd[-2:] == ["'model.layer_pattern=MM*M'", "'run_dir=runs/${model.preset}'"]
    one_node = spec(hosts=[Host("localhost", 2)], overrides=["model.layer_pattern=MM*M"])
    cmd = deepspeed_command(one_node, "h")  # local launch: argv goes to Popen as is, no shell
    assert cmd[-1] == "model.layer_pattern=MM*M"
    assert "--no_ssh_check" in cmd and "--launcher" not in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


def test_torchrun_one_command_per_node():
    nodes = torchrun_commands(spec(), CALLER_ENV)
    assert [n.host for n in nodes] == ["node-001", "node-002"]
    for rank, n in enumerate(nodes):
        assert n.argv == [
            PY,
            "-m",
            "launch.torchrun",
            "--nproc_per_node=8",
            "--nnodes=2",
            f"--node_rank={rank}",
            "--master_addr=node-001",
            "--master_port=29500",
            "-m",
            "train",
            "model=bench",
            "trainer.max_steps=10",
        ]
        ssh = n.ssh("/repo")
        assert ssh[:3] == ["ssh", "-o", "BatchMode=yes"] and ssh[3] == n.host
        assert (
            ssh[4].startswith("cd /repo && env ")
            and "NCCL_NVLS_ENABLE=0" in ssh[4]
            and "secret" not in ssh[4]
        )
    local = torchrun_commands(spec(hosts=[Host("localhost", 2)]))
    assert "--standalone" in local[0].argv and local[0].ssh("/repo")[0] == "bash"
    with pytest.raises(ValueError, match="torchrun needs the same slots"):
        torchrun_commands(spec(hosts=[Host("a", 8), Host("b", 4)]))


def test_overrides_must_come_after_double_dash():
    with pytest.raises(LaunchError, match="not a Hydra override"):
        spec(overrides=["--nodes", "2"])


@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_slurm_script(mode):
    opts = SlurmOptions(nodes=2, gpus_per_node=8, mode=mode, partition="gpu", time="01:00:00")
    script = render_sbatch(
        spec(ds_launcher="slurm", overrides=["model.layer_pattern=MM*M"]), opts, CALLER_ENV
    )
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --signal=TERM@120\n" in script
    assert "export NCCL_NVLS_ENABLE=0\n" in script and "export NCCL_IB_HCA=mlx5\n" in script
    assert "secret" not in script
    if mode == "torchrun":
        assert "#SBATCH --ntasks-per-node=1\n" in script
        assert "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT" in script and "--nproc_per_node=8" in script
        assert script.rstrip().endswith("-m train 'model.layer_pattern=MM*M'")
    else:  # builds the hostfile, deepspeed's slurm backend runs srun -n 16: 8 tasks per node
        assert "#SBATCH --ntasks-per-node=8\n" in script
        assert 'sed "s/$/ slots=8/"' in script and 'echo "MASTER_ADDR=$MASTER_ADDR" >>' in script
        assert "--no_ssh_check --launcher slurm launch/entry.py 'model.layer_pattern=MM*M'" in script
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_srun_command_expands_slurm_variables():
    cmd = srun_torchrun_command(spec(), 8)
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    assert "--nnodes=$SLURM_NNODES" in cmd and "--rdzv_id=$SLURM_JOB_ID" in cmd


def test_run_cli_dry_run(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-001 slots=8\nnode-002 slots=8\n")
    for launcher, expect in [
        ("deepspeed", "--launcher openmpi launch/entry.py model=bench"),
        ("torchrun", "--node_rank=1"),
        ("slurm", "sbatch "),
    ]:
        rc = launch_run.main(
            [
                "--hostfile",
                str(hosts),
                "--launcher",
                launcher,
                "--ds-launcher",
                "openmpi",
                "--launch-dir",
                str(tmp_path / "l"),
                "--env",
                "NCCL_DEBUG=INFO",
                "--dry-run",
                "model=bench",
            ]
        )
        out = capsys.readouterr().out
        assert rc == 0 and expect in out and "NCCL_DEBUG=INFO" in out
    assert not (tmp_path / "l").exists()  # a dry run writes nothing
    assert launch_run.main(["--hostfile", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_entry_maps_launcher_variables():
    assert torch_env({"RANK": "3", "OMPI_COMM_WORLD_RANK": "1"}) == {}  # torchrun / pdsh already set it
    ompi = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "5",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "MASTER_ADDR": "node-001",
    }
    assert torch_env(ompi) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    srun = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "n"}
    assert torch_env(srun) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    with pytest.raises(SystemExit, match="MASTER_ADDR"):
        torch_env({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_entry_runs_train_as_main(tmp_path):
    """launch/entry.py is a script (the deepspeed runner's slurm backend cannot run -m): it reaches
    train's Hydra entry point with the arguments."""
    out = subprocess.run(
        [sys.executable, "launch/entry.py", "--local_rank=0", "trainer.max_steps=3", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max_steps: 3" in out.stdout


def test_dry_run_validates_the_overrides_as_a_run_would(tmp_path, capsys):
    argv = [
        "--gpus-per-node",
        "2",
        "--launcher",
        "deepspeed",
        "--launch-dir",
        str(tmp_path / "l"),
        "--dry-run",
    ]
    assert launch_run.main([*argv, "--", "optim.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [
        "ConfigError: optim.lrr: Key 'lrr' not in 'OptimConfig' (Could not override 'optim.lrr'.)"
    ]
    assert launch_run.main([*argv, "--", "trainer.max_steps=-5"]) == 2
    assert capsys.readouterr().err.strip() == "ConfigError: trainer.max_steps: must be >= 1, got -5"
    assert launch_run.main([*argv, "--", "trainer.max_steps=5"]) == 0
    assert not (tmp_path / "l").exists()


def test_the_slurm_log_folder_exists_before_submission(tmp_path, monkeypatch):
    from launch import slurm

    monkeypatch.chdir(tmp_path)  # sbatch resolves #SBATCH --output against the directory it runs in
    a = launch_run.parser().parse_args(["--nodes", "1", "--gpus-per-node", "1", "--launcher", "slurm"])
    s, _ = launch_run.build_spec(a)
    plan = launch_run.make_plan(s, "slurm", tmp_path / "l", None, a)
    plan.procs = [("submit", ["sh", "-c", "test -d runs/slurm"], {})]  # sbatch's view at submission
    assert launch_run.execute(plan) == 0
    shutil.rmtree(tmp_path / "runs")
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "1", "-o", str(tmp_path / "j.sbatch")]) == 0
    assert (tmp_path / "runs" / "slurm").is_dir()
