"""Process group from the launcher's environment: the same code under torchrun, deepspeed or no launcher.

torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
a plain `python -m train` is a world of one. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.topology import Topology, check_expert_parallel, make_topology

from .config import ConfigError

log = logging.getLogger("train.distributed")
Dist = Topology  # the one topology object (parallel/topology.py); this name stays for the trainer's modules


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(pcfg: ParallelConfig, local_rank: int) -> torch.device:
    want = pcfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda, but torch sees no CUDA GPU")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
    return torch.device("cuda", local_rank)


def set_ds_accelerator(device: torch.device) -> None:
    """DeepSpeed's accelerator for our device. A DS_ACCELERATOR=cpu inherited on a GPU run (e.g. from a CPU
    test's environment) would keep DeepSpeed's tensors on the CPU and fail its first NCCL broadcast with "No
    backend type associated with device type cpu": the GPU wins, with a warning."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        log.warning("DS_ACCELERATOR=cpu in the environment of a GPU run: DeepSpeed uses cuda")
        os.environ["DS_ACCELERATOR"] = "cuda"


def init(pcfg: ParallelConfig) -> Topology:
    """Join (or, alone, create) the default process group through DeepSpeed, which needs it anyway, and make
    this process's topology (its expert-parallel position and groups)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and "MASTER_ADDR" not in os.environ:  # no launcher: a world of one
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    device = resolve_device(pcfg, local_rank)
    set_ds_accelerator(device)  # before deepspeed is imported
    if device.type == "cuda":
        torch.cuda.set_device(device)
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch:  # "9.0a" (arch-specific suffix) makes deepspeed.initialize fail parsing it as an int
            os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)a\b", r"\1", arch)
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend=nccl needs parallel.device=cuda")

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from parallel.zero import skip_cpu_shm_build

    skip_cpu_shm_build()
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=pcfg.timeout_s), verbose=False
    )
    if dist.get_world_size() != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    ep = pcfg.expert_parallel_size
    try:
        check_expert_parallel(world, ep)
    except ValueError as e:
        raise ConfigError(f"parallel.expert_parallel_size: {e}") from None
    d = make_topology(ep, device, local_rank)
    log.info(
        "rank %d/%d on %s (%s), expert-parallel rank %d of %d", d.rank, world, device, backend, d.ep.rank, ep
    )
    return d


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
