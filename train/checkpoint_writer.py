"""Checkpoint files written in the background: the training loop waits only for a copy of the state in host
memory (pinned on a GPU, reused from one save to the next), a thread writes the files.

`SnapshotEngine` is DeepSpeed's checkpoint engine for our saves: where DeepSpeed would torch.save a state
dict, it keeps a host copy for the writer, without the tensors written elsewhere (every tensor is written
once): the module weights (model_state.safetensors holds them: resume, export and eval read that file) and
ZeRO's fp32 master partitions (equal to the fp32 module weights; a load refreshes them from the weights).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

log = logging.getLogger("train.checkpoint")
FP32_MASTERS = (
    "single_partition_of_fp32_groups"  # deepspeed.checkpoint.constants.SINGLE_PARTITION_OF_FP32_GROUPS
)
WEIGHTS_ELSEWHERE = "__weights_in_model_state_safetensors__"


PAGE = 4096  # host buffers start on their own page: each is registered (pinned) alone


def _pin(ptr: int, size: int) -> None:
    """Page-lock host memory that is already allocated (cudaHostRegister, portable: every device sees it)."""
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))
    if err != 0:
        raise RuntimeError(f"pinning {size} bytes of host memory for checkpoints failed: cudaError {err}")


def _unpin(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostCopy:
    """Copies of tensors in host memory. On a GPU the buffers are pinned and kept for the next save (at most
    one save is in flight, so the previous write is done with them); on the CPU each save clones.

    Pinning is slow (page-locking runs at a few GB/s: 14 s for `bench`'s state on an H200), so `prepare`
    does it ahead of the first save, in a background thread, from a plan of that save's tensors (`plan`:
    the shapes `copy` would see): one host arena of exactly their size, one page-aligned view per tensor,
    each view pinned alone. A tensor the plan did not foresee gets its own pinned buffer at the save."""

    def __init__(self, pin: bool, pin_fn=_pin, unpin_fn=_unpin) -> None:
        self.pin, self.pin_fn, self.unpin_fn, self.buffers, self.bytes = pin, pin_fn, unpin_fn, {}, 0
        self.plan: list | None = None  # while planning: (key, shape, dtype) of each tensor, nothing copied
        self.preparing: threading.Thread | None = None
        self.prepare_error: BaseException | None = None
        self.arena: mmap.mmap | None = None  # the memory of the prepared buffers
        self.prepared_s = 0.0

    def copy(self, obj, key: tuple = ()):
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if self.plan is not None:
                self.plan.append((key, tuple(t.shape), t.dtype))
                return None
            self.bytes += t.numel() * t.element_size()
            if not self.pin:
                return t.to("cpu", copy=True)
            self.ready()
            buf = self.buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            buf.copy_(t, non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self.copy(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self.copy(v, (*key, i)) for i, v in enumerate(obj))
        return obj

    def prepare(self, plan: list, device: torch.device | None = None) -> None:
        """Allocate and pin the buffers of `plan` in a background thread (`ready` waits for it)."""
        self.preparing = threading.Thread(
            target=self._allocate, args=(plan, device), name="ckpt-pin", daemon=True
        )
        self.preparing.start()

    def _allocate(self, plan: list, device: torch.device | None) -> None:
        t0, pinned = time.perf_counter(), []
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            sizes = [-(-math.prod(shape) * dtype.itemsize // PAGE) * PAGE for _, shape, dtype in plan]
            # anonymous memory, page-aligned; one tensor with its own storage per view (torch.save writes a
            # tensor's whole storage: views of one would each write the arena). MAP_POPULATE faults the pages
            # in here (GIL released), not inside cudaHostRegister, which holds the driver's lock meanwhile
            # and so stalls the training step's kernel launches (H200, 26 GB: one step took 11.55 s, not 0.14)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            arena, off, buffers = mmap.mmap(-1, max(1, sum(sizes)), flags=flags), 0, {}
            base = ctypes.addressof(ctypes.c_char.from_buffer(arena))
            for (key, shape, dtype), size in zip(plan, sizes, strict=True):
                n = math.prod(shape)
                if n == 0:
                    buffers[key] = torch.empty(shape, dtype=dtype)
                    continue
                self.pin_fn(base + off, size)
                pinned.append(base + off)
                buffers[key] = torch.frombuffer(arena, dtype=dtype, count=n, offset=off).view(shape)
                off += size
            self.arena, self.buffers = arena, buffers
        except BaseException as e:  # noqa: BLE001 - the save then pins per tensor (reported by `ready`)
            self.prepare_error = e
            for ptr in pinned:  # hold no second copy: give back what was pinned
                self.unpin_fn(ptr)
        self.prepared_s = time.perf_counter() - t0

    def ready(self) -> None:
        """Wait for `prepare`'s buffers (if it runs)."""
        if self.preparing is None:
            return
        self.preparing.join()
        self.preparing = None
        if self.prepare_error is not None:
            log.warning(
                "pinning checkpoint buffers ahead failed (%s): the save pins its own", self.prepare_error
            )
        else:
            log.info(
                "pinned %.2f GB of host buffers for checkpoints in %.2fs (in the background)",
                len(self.arena) / 1e9,
                self.prepared_s,
            )

    def done(self) -> None:
        """Wait until the device-to-host copies are complete (the state may then change on the device)."""
        if self.pin:
            torch.cuda.synchronize()


class SnapshotEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine: `save` keeps host copies in `jobs` for the writer; `load` is `loader`
    (safe loading) and puts the live module's weights where a checkpoint left them out."""

    def __init__(self, loader, module) -> None:
        super().__init__()
        self.loader, self.module, self.host = loader, module, None
        self.jobs: list[tuple[str, Path, object]] = []
        self.strip_weights = False
        self.filled_weights = False  # the last load found the weights left out (read them from safetensors)

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        sd = dict(state_dict)
        if "module" in sd and self.strip_weights:
            sd["module"] = WEIGHTS_ELSEWHERE
        if isinstance(sd.get("optimizer_state_dict"), dict):
            sd["optimizer_state_dict"] = {
                k: v for k, v in sd["optimizer_state_dict"].items() if k != FP32_MASTERS
            }
        copied = self.host.copy(sd, (Path(path).name,))
        if self.host.plan is None:
            self.jobs.append(("torch", Path(path), copied))

    def load(self, path: str, map_location=None):
        sd = self.loader(path, map_location=map_location)
        if isinstance(sd, dict) and sd.get("module") == WEIGHTS_ELSEWHERE:
            # DeepSpeed loads these (no change); Checkpointer.load then reads model_state.safetensors.
            sd["module"] = {k: v for k, v in self.module.state_dict().items()}
            self.filled_weights = True
        return sd

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # HostCopy copies every tensor anyway; DeepSpeed need not clone them first


def write(kind: str, path: Path, payload) -> int:
    """One file, fsynced; returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save(payload, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        tensors, metadata = payload
        save_file(tensors, str(path), metadata=metadata)
    else:
        path.write_text(payload)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.stat().st_size


class Writer:
    """One background thread writing one save's files; `kill_at` ("write": after the first file, "written":
    after the last) SIGKILLs this process there, to test that a save killed midway is never `latest`."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.write_s = 0.0
        self.bytes = 0
        self.path: Path | None = None  # the file being written

    def start(self, jobs: list, kill_at: str | None = None) -> None:
        assert self.thread is None, "one save in flight at most"
        self.error, self.write_s, self.bytes = None, 0.0, 0
        self.thread = threading.Thread(
            target=self._run, args=(jobs, kill_at), name="ckpt-writer", daemon=True
        )
        self.thread.start()

    def _run(self, jobs: list, kill_at: str | None) -> None:
        t0 = time.perf_counter()
        try:
            for i, (kind, path, payload) in enumerate(jobs):
                self.path = path
                self.bytes += write(kind, path, payload)
                if kill_at == "write" and i == 0:
                    _kill("in the middle of the background write")
            if kill_at == "written":
                _kill("after the background write, before the commit")
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by `check`
            self.error = e
        self.write_s = time.perf_counter() - t0

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def finished(self) -> bool:
        """The files are written (raises the writer's error, if any)."""
        if self.thread is None or self.thread.is_alive():
            return False
        self.check()
        return True

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.check()

    def check(self) -> None:
        if self.error is not None:
            from .checkpoint_layout import CheckpointError

            e, self.error = self.error, None
            raise CheckpointError(f"writing a checkpoint failed: {write_cause(e, self.path)}") from e

    def reset(self) -> None:
        self.thread = None


def _kill(where: str) -> None:
    log.warning("faults.kill_during_save_step: killing this process %s", where)
    os.kill(os.getpid(), signal.SIGKILL)


# ---- disk space: foreseen before a save, named when a write fails ------------------------------------
GB = 1e9
LOW_SPACE = 64 << 20  # after a failed write, less free space than this: the disk was full


def free_bytes(path: Path) -> int:
    """Bytes this user may still write in the filesystem of `path` (of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def room_problem(root: Path, need: float, free: float, what: str) -> str | None:
    """One line when `need` bytes (with a 2% margin) do not fit in `free`; None when they do."""
    if need * 1.02 <= free:
        return None
    return (
        f"{what} needs {size(need)}, {root} has {size(free)} free: lower checkpoint.keep_last, free space "
        f"there, or set checkpoint.dir to a larger disk"
    )


def room_for_save(ck, path: Path, step: int) -> bool:
    """Collective, in `Checkpointer.start` (ck) after the host copy: this save's bytes (every rank's copy) fit
    in the free space of every rank's view of checkpoint.dir; else one line, the partial directory removed,
    and False (training goes on; the next interval tries again)."""
    from .distributed import all_reduce_, barrier

    def total(x: float) -> float:  # on the process group's device: NCCL reduces CUDA tensors only
        return float(all_reduce_(torch.tensor([x], dtype=torch.float64, device=ck.dist.device))[0])

    need = total(float(ck.snapshot.host.bytes))
    why = room_problem(ck.root, need, free_bytes(ck.root), f"the checkpoint of step {step}")
    if not total(float(why is not None)):
        return True
    ck.snapshot.jobs = []
    barrier()
    ck.no_room = why or "no room on another rank"
    if ck.dist.is_main:
        shutil.rmtree(path, ignore_errors=True)
        log.error("not saved: %s (the next interval tries again)", ck.no_room)
    return False


def check_room_ahead(ck, plan: list) -> None:
    """Rank 0, at the first step: whether checkpoint.keep_last saves of the planned size (`plan`: this rank's
    tensors, times the ranks) fit beside the complete ones already kept; one warning with the figures if not."""
    from .checkpoint_layout import is_complete, step_dirs

    if not ck.dist.is_main:
        return
    each = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in plan) * ck.dist.world_size
    more = max(
        1, ck.cfg.keep_last + 1 - sum(1 for _, p in step_dirs(ck.root) if is_complete(p))
    )  # written before a prune
    what = f"checkpoint.keep_last={ck.cfg.keep_last} ({more} more checkpoints of {size(each)} each)"
    if why := room_problem(ck.root, more * each, free_bytes(ck.root), what):
        log.warning("%s", why)


def write_cause(e: BaseException, path: Path | None) -> str:
    """What made a write fail, in words: the OS error (e.g. "No space left on device") where one is in the
    chain; a full disk where the folder has next to no space left (torch.save's own message then is
    "unexpected pos ..."); else the error itself. Names the file."""
    where = f" ({path})" if path is not None else ""
    err: BaseException | None = e
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return f"{os.strerror(err.errno)}{where}"
        err = err.__cause__ or err.__context__
    if path is not None:
        try:
            free = free_bytes(path.parent)
        except OSError:
            free = None
        if free is not None and free < LOW_SPACE:
            return f"{os.strerror(errno.ENOSPC)}{where}: {free / 1e6:.0f} MB free"
    return f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{where}"
