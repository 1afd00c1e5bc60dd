"""`python launch/entry.py [overrides]`: `python -m train` under any launcher of the deepspeed runner.

train/ reads torch's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The deepspeed runner's
pdsh backend (and torchrun) set them; its openmpi, mvapich and slurm backends start the processes through
mpirun / srun, which set their own variables instead (and the slurm backend cannot run `-m module`). This
file is a script, so every backend can start it; it maps those variables and then runs train's __main__.
MASTER_ADDR / MASTER_PORT come from the launch environment (launch/commands.py exports them).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# (rank, world size, local rank) as each launcher names them, most specific first: mpirun inside a Slurm
# allocation sets both OMPI_* and SLURM_* (the latter describe the batch step, not the MPI ranks).
RANK_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (Hydra PM)
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
)


def torch_env(environ: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables to add: none when RANK is set (torchrun, deepspeed's pdsh backend)."""
    if "RANK" in environ:
        return {}
    for rank, size, local in RANK_VARS:
        if rank in environ and size in environ:
            out = {"RANK": environ[rank], "WORLD_SIZE": environ[size], "LOCAL_RANK": environ.get(local, "0")}
            if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in environ:
                raise SystemExit(
                    f"launch/entry.py: {rank} is set but MASTER_ADDR is not; export MASTER_ADDR and "
                    "MASTER_PORT to every rank (python -m launch.run does)"
                )
            return out
    return {}


def main() -> None:
    root = str(Path(__file__).resolve().parent.parent)  # run as a script: make the repository importable
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.update(torch_env(dict(os.environ)))
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
