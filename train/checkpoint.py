"""Saving checkpoints: DeepSpeed's files made atomic, with our own state as JSON and plain tensors. The layout
(file names, when a checkpoint is complete) is train/checkpoint_layout.py; loading is train/checkpoint_load.py.

Saves are asynchronous (train/checkpoint_writer.py): the loop waits for a host copy, a thread writes. Commit: each
rank's "written" flag joins a step's all-reduce; once every rank's files are written, rank 0 fsyncs the directory,
writes trainer_state.json (tmp + rename) and only then points `latest` at it (tmp + rename). A checkpoint is
complete iff it holds trainer_state.json, so a process killed at any moment of a save leaves `latest` on the
previous complete checkpoint; the partial directory is ignored on resume and removed by the next save.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from parallel.checkpoint import save_local_experts, save_portable

from .checkpoint_layout import (
    LATEST,
    MODEL_CONFIG_FILE,
    STATE_FILE,
    STATE_VERSION,
    WEIGHTS_FILE,
    atomic_write,
    find_latest,
    fsync_dir,
    is_complete,
    rng_file,
    step_dirs,
    tag_for,
)
from .checkpoint_load import load_checkpoint, safe_load
from .config import CheckpointConfig, FaultConfig
from .distributed import Dist, all_reduce_, barrier
from .rng import rng_state

log = logging.getLogger("train.checkpoint")


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, dist: Dist, faults: FaultConfig | None = None) -> None:
        self.cfg, self.dist, self.faults = cfg, dist, faults or FaultConfig()
        self.root = Path(cfg.dir).absolute()
        self.pending: dict | None = None  # the save in flight: written in the background, not committed yet
        self.writer = None
        self.stall_s = 0.0
        self.no_room: str | None = None  # why the last save was skipped (disk space)

    def install_safe_loading(self, engine) -> None:
        """Our checkpoint engine for DeepSpeed: saves go to host copies for the background writer, loads
        through `safe_load` (no pickled code) unless checkpoint.weights_only=false."""
        from .checkpoint_writer import HostCopy, SnapshotEngine

        loader = safe_load if self.cfg.weights_only else engine.checkpoint_engine.load
        self.snapshot = SnapshotEngine(loader, engine.module)
        self.snapshot.host = HostCopy(pin=self.pins)
        engine.checkpoint_engine = self.snapshot
        # ZeRO's fp32 masters are not saved (they equal the fp32 weights): loads refresh them from the weights
        engine._config.zero_config.load_from_fp32_weights = False

    def latest(self) -> Path | None:
        return find_latest(self.root)

    # ---- save ------------------------------------------------------------------------------------------
    def save(
        self, engine, step: int, state: dict, weights: dict | None = None, consolidated: bool = True
    ) -> Path:
        """Collective and synchronous: `start`, then `wait` for the files and the commit."""
        path = self.start(engine, step, state, weights, consolidated)
        self.wait()
        return path

    def start(
        self, engine, step: int, state: dict, weights: dict | None = None, consolidated: bool = True
    ) -> Path | None:
        """Collective: every rank calls it with the same step. Copies the state to host memory (the only
        time training waits) and starts the background write; `commit` (when every rank's `written()`) or
        `wait` publish it. `state` (JSON-able, with "model_config") and `weights` (the consolidated model)
        are rank 0's; consolidated=False (the same on every rank): there are none, every expert-parallel
        position writes its own experts. A save still in flight is finished first (one at a time).
        None, with one line, when the checkpoint does not fit in the free space of checkpoint.dir."""
        from .checkpoint_writer import Writer

        if self.pending is not None:
            self.wait()
        tag = tag_for(step)
        path = self.root / tag
        t0 = time.perf_counter()
        if is_complete(path):  # never overwrite a complete checkpoint (a crash mid-save would lose it)
            log.warning("%s is a complete checkpoint already; not saving over it", path)
            return path
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # the partial directory of a save killed earlier
                shutil.rmtree(path)
        barrier()
        jobs, tensors = self._copy_state(engine, self.root, tag, weights, consolidated)
        from .checkpoint_writer import room_for_save

        if not room_for_save(self, path, step):
            return None
        if not consolidated:  # no consolidated weights: each EP position keeps its own experts
            save_local_experts(engine.module, self.dist, path)
        if self.cfg.portable:  # gathers per parameter: written now, not in the background
            save_portable(engine, self.dist, path)
        if self.dist.is_main and consolidated:
            meta = {"format": "pt", "step": str(step)}
            jobs.append(("safetensors", path / WEIGHTS_FILE, (tensors, meta)))
            jobs.append(("text", path / MODEL_CONFIG_FILE, json.dumps(state["model_config"], indent=1)))
        self.snapshot.host.done()
        kill = self.faults.kill_during_save_step == step
        self.writer = self.writer or Writer()
        self.writer.start(jobs, self.faults.kill_during_save_phase if kill else None)
        self.pending = {"tag": tag, "path": path, "state": state, "step": step, "kill": kill}
        self.stall_s = time.perf_counter() - t0
        return path

    @property
    def pins(self) -> bool:
        """Host copies are pinned (on a GPU): `prepare` pins them ahead of the first save."""
        return self.dist.device.type == "cuda"

    def _snapshot_engine(self, engine):
        from .checkpoint_writer import SnapshotEngine

        if not isinstance(engine.checkpoint_engine, SnapshotEngine):
            self.install_safe_loading(engine)
        self.snapshot = engine.checkpoint_engine  # installed by another Checkpointer of this engine, maybe
        return self.snapshot

    def _copy_state(self, engine, root: Path, tag: str, weights: dict | None, consolidated: bool):
        """Collective: host copies of DeepSpeed's files and this rank's RNG state (the writer's jobs) and,
        on rank 0 when consolidated, of the weights. While the host copy plans (`plan`) nothing is copied."""
        snap = self._snapshot_engine(engine)
        host = snap.host
        host.bytes, snap.jobs = 0, []
        snap.strip_weights = consolidated  # the weights go to model_state.safetensors only
        engine.save_checkpoint(
            str(root), tag=tag, client_state={"trainer_state": STATE_FILE}, save_latest=False
        )
        jobs, snap.jobs = snap.jobs, []
        rng = host.copy(rng_state(self.dist.device), ("rng",))
        jobs.append(("torch", rng_file(root / tag, self.dist.rank), rng))
        tensors = None
        if self.dist.is_main and consolidated:
            tensors = host.copy({k: v.contiguous() for k, v in weights.items()}, ("weights",))
        return jobs, tensors

    def plan(self, engine, weights: dict | None = None, consolidated: bool = True) -> list:
        """Collective: the (key, shape, dtype) of every tensor a save would copy to host memory, from a
        dry run of the save (DeepSpeed's state dicts, no copy, no file but DeepSpeed's empty directories
        and recovery script, in a scratch directory removed at once)."""
        host = self._snapshot_engine(engine).host
        scratch = self.root / ".plan"
        host.plan = []
        try:
            self._copy_state(engine, scratch, "plan", weights, consolidated)
            plan = host.plan
        finally:
            host.plan = None
            barrier()
            if self.dist.is_main:
                shutil.rmtree(scratch, ignore_errors=True)
        return plan

    def prepare(self, engine, weights: dict | None = None, consolidated: bool = True) -> None:
        """Collective, before the first save (the trainer: after its first step, once the optimizer's
        states exist): on a GPU, plan the save and pin its host buffers in a background thread, so the
        first save stalls only for the copy, like every later one (no pinning on the CPU). Warns when
        checkpoint.keep_last saves will not fit (checkpoint_writer.check_room_ahead)."""
        host = self._snapshot_engine(engine).host
        if host.buffers or host.preparing is not None:
            return
        from .checkpoint_writer import check_room_ahead

        plan = self.plan(engine, weights, consolidated)
        check_room_ahead(self, plan)
        if self.pins:
            host.prepare(plan, self.dist.device)

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def written(self) -> bool:
        """This rank's files of the save in flight are written (False when none is in flight)."""
        return self.pending is not None and self.writer.finished()

    def commit(self, total_bytes: float | None = None) -> dict:
        """Every rank, once every rank's files are written (the trainer learns it from the step's all-reduce,
        `wait` from a barrier): rank 0 fsyncs the directory, writes trainer_state.json (tmp + rename) and
        then `latest`, then prunes. Returns the save's figures (stall, write time, bytes)."""
        p, self.pending = self.pending, None
        self.writer.reset()
        path, tag = p["path"], p["tag"]
        if self.dist.is_main:
            fsync_dir(path)
            atomic_write(path / STATE_FILE, json.dumps({**p["state"], "version": STATE_VERSION}, indent=1))
            if p["kill"] and self.faults.kill_during_save_phase == "state":
                from .checkpoint_writer import _kill

                _kill(f"after {STATE_FILE}, before {LATEST}")
            atomic_write(self.root / LATEST, tag)
            for old in self.prune():
                log.info("removed checkpoint %s", old.name)
        figures = {
            "checkpoint/step": p["step"],
            "checkpoint/stall_s": self.stall_s,
            "checkpoint/write_s": self.writer.write_s,
            "checkpoint/bytes": float(self.writer.bytes if total_bytes is None else total_bytes),
        }
        log.info(
            "saved checkpoint %s: training waited %.2fs, written in the background in %.2fs, %.2f GB",
            path,
            self.stall_s,
            self.writer.write_s,
            figures["checkpoint/bytes"] / 1e9,
        )
        return figures

    def wait(self) -> dict | None:
        """Collective: finish the save in flight (if any) and commit it."""
        if self.pending is None:
            return None
        self.writer.join()
        # on the process group's device: NCCL reduces CUDA tensors only
        total = all_reduce_(
            torch.tensor([float(self.writer.bytes)], dtype=torch.float64, device=self.dist.device)
        )
        figures = self.commit(float(total[0]))
        barrier()
        return figures

    def prune(self) -> list[Path]:
        """Rank 0, after a commit: keep the newest `keep_last` complete checkpoints and every `keep_every`-th
        step; remove the rest and any partial directory (no save is in flight now)."""
        done = [(s, p) for s, p in step_dirs(self.root) if is_complete(p)]
        keep = {p for _, p in done[-self.cfg.keep_last :]}
        keep |= {p for s, p in done if self.cfg.keep_every and s % self.cfg.keep_every == 0}
        latest = find_latest(self.root)
        removed = []
        for _, p in step_dirs(self.root):
            if p not in keep and p != latest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    # ---- load ------------------------------------------------------------------------------------------
    def load(self, engine, ckpt: Path, *, optimizer: bool = True) -> dict:
        """Collective: `load_checkpoint` (train/checkpoint_load.py) through our checkpoint engine."""
        from .checkpoint_writer import SnapshotEngine

        if not isinstance(engine.checkpoint_engine, SnapshotEngine):
            self.install_safe_loading(engine)
        return load_checkpoint(engine, ckpt, self.dist, optimizer=optimizer)
