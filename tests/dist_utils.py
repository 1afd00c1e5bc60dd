"""Multi-process tests on CPU (OLMo-core style): `run_distributed(fn, world_size, *args)`.

Every rank runs `fn(*args)` after `torch.distributed` is initialised with gloo through a fresh file store
(no port to race for on a shared machine). Children fork by default: they inherit the imported torch,
which saves ~2 s of start-up per rank on a small CPU box; set DIST_TEST_START_METHOD=spawn to check
`fn` is importable and pickle-clean. A hung collective fails the test after `timeout` seconds instead
of hanging CI; an exception on any rank fails it with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world_size: int, store_path: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)  # N ranks on a 2-core machine; also keeps forked OpenMP pools out of the way
    from parallel.zero import skip_cpu_shm_build

    skip_cpu_shm_build()  # else the first DeepSpeed engine compiles a C++ op for ~100 s
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
    )
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        fn(*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args, timeout: float = 90.0, start_method: str | None = None
) -> None:
    """Run fn(*args) on `world_size` gloo ranks; raise if any rank fails or all are not done in `timeout` s."""
    method = start_method or os.environ.get("DIST_TEST_START_METHOD", "fork")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, store, timeout, args),
            nprocs=world_size,
            join=False,
            start_method=method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"{getattr(fn, '__name__', fn)} on {world_size} ranks did not finish "
                        f"in {timeout:.0f} s (a hung collective?)"
                    )
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
