"""DeepSpeed checkpoints made atomic, with our own state as JSON and plain tensors.

Layout of <checkpoint.dir>:
    latest                      tag of the newest complete checkpoint (DeepSpeed's convention), replaced atomically
    step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt     DeepSpeed: optimizer states (the module
                                    entry is a marker: every tensor is written once, the weights below)
        rng/rank_00000.pt ...   each rank's RNG states (plain tensors)
        model_state.safetensors, model_config.json   the whole model: resume, jamba.export and train.eval read it
        experts_ep<r>.safetensors   only without consolidated weights: EP position r's experts (parallel/checkpoint.py)
        portable/                   checkpoint.portable=true: full fp32 masters + Adam moments per parameter
                                    (experts per EP position), for a resume on another world / EP size
        trainer_state.json      step, samples, data-loader state, W&B run id, resolved config, param shapes

Saves are asynchronous (train/checkpoint_writer.py): the loop waits for a host copy, a thread writes. Commit: each
rank's "written" flag joins a step's all-reduce; once every rank's files are written, rank 0 fsyncs the directory,
writes trainer_state.json (tmp + rename) and only then points `latest` at it (tmp + rename). A checkpoint is
complete iff it holds trainer_state.json, so a process killed at any moment of a save leaves `latest` on the
previous complete checkpoint; the partial directory is ignored on resume and removed by the next save.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from parallel.zero import SAFE_GLOBALS

from .config import CheckpointConfig, FaultConfig
from .distributed import Dist, all_reduce_, barrier
from .rng import rng_state, set_rng_state

log = logging.getLogger("train.checkpoint")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model_state.safetensors"  # names read by jamba/export.py
MODEL_CONFIG_FILE = "model_config.json"
LATEST = "latest"
STATE_VERSION = 1
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here (missing, incomplete, of another model); the message says why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(d: Path) -> bool:
    return (d / STATE_FILE).is_file()


def _tags(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and p.is_dir())


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for _, p in _tags(root) if is_complete(p)]


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if _TAG.fullmatch(tag) and is_complete(root / tag):  # a step_N child: never a path out of root
            return root / tag
        log.warning(
            "%s names %r, which is not a complete step_N checkpoint in it; looking for the newest complete one",
            pointer,
            tag[:100],
        )
    done = [p for _, p in _tags(root) if is_complete(p)]
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a checkpoint root (then its latest complete checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.is_dir() and (found := find_latest(p)) is not None:
        return found
    if p.is_dir() and _TAG.match(p.name):
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {STATE_FILE}: its save was interrupted)")
    raise CheckpointError(
        f"no complete checkpoint at {p} (expected a step_* directory holding {STATE_FILE}, "
        f"or a directory of them)"
    )


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ckpt / STATE_FILE}: {e}") from None
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{ckpt}: trainer state version {state.get('version')!r}, expected {STATE_VERSION}"
        )
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _safe_globals() -> list:
    out = []
    for dotted in SAFE_GLOBALS:
        mod, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(mod), name))
    return out


def safe_load(path: str | Path, map_location=None):
    """torch.load without running pickled code: tensors, containers and DeepSpeed's allow-listed data classes."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
            raise CheckpointError(
                f"{path} holds objects outside the weights_only allow-list ({e}). If you trust "
                f"this checkpoint, set checkpoint.weights_only=false"
            ) from None


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
        from parallel.checkpoint import save_local_experts, save_portable

        if not consolidated:  # no consolidated weights: each EP position keeps its own experts
            save_local_experts(engine.module, path)
        if self.cfg.portable:  # gathers per parameter: written now, not in the background
            save_portable(engine, path)
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
        jobs.append(("torch", root / tag / "rng" / f"rank_{self.dist.rank:05d}.pt", rng))
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
            _fsync(path)
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
        done = [(s, p) for s, p in _tags(self.root) if is_complete(p)]
        keep = {p for _, p in done[-self.cfg.keep_last :]}
        keep |= {p for s, p in done if self.cfg.keep_every and s % self.cfg.keep_every == 0}
        latest = find_latest(self.root)
        removed = []
        for _, p in _tags(self.root):
            if p not in keep and p != latest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    # ---- load ------------------------------------------------------------------------------------------
    @staticmethod
    def _load_deepspeed(engine, ckpt: Path) -> None:
        """Same layout: DeepSpeed's files (dense weights, this rank's ZeRO partitions), then this rank's
        experts from our per-EP-position files. DeepSpeed's loader wants per-expert files in the layout of
        its own MoE layer, which its saver never writes for ours (its module file holds rank 0's experts
        only): it loads as a dense model."""
        from parallel.checkpoint import _ep_position, _expert_files, load_local_experts

        moe, engine.has_moe_layers = engine.has_moe_layers, False
        engine.checkpoint_engine.filled_weights = False
        try:
            loaded, _ = engine.load_checkpoint(
                str(ckpt.parent),
                tag=ckpt.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=True,
            )
        except FileNotFoundError as e:
            raise CheckpointError(f"{ckpt} lacks a file DeepSpeed needs: {e}") from None
        finally:
            engine.has_moe_layers = moe
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt} (files missing?)")
        if getattr(engine.checkpoint_engine, "filled_weights", False):
            Checkpointer._load_weights(engine, ckpt, experts_only=False)  # the weights' only copy
            return
        if _ep_position(engine.module)[1] == 1:
            return
        if _expert_files(ckpt):
            try:
                load_local_experts(engine.module, ckpt)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{ckpt}: cannot read this rank's experts: {e}") from None
            if not engine.zero_load_from_fp32_weights():  # else ZeRO's fp32 masters are restored already
                engine.optimizer.refresh_fp32_params()
        else:  # a checkpoint from before the per-EP-position files
            Checkpointer._load_weights(engine, ckpt, experts_only=True)

    @staticmethod
    def _load_weights(engine, ckpt: Path, experts_only: bool) -> None:
        """This rank's part of model_state.safetensors (its slice of every expert tensor under expert
        parallelism) into the module, then into the ZeRO optimizer's fp32 copy."""
        from safetensors.torch import load_file

        from parallel.expert_parallel import load_full_state_dict

        if not (ckpt / WEIGHTS_FILE).is_file():
            raise CheckpointError(
                f"{ckpt} has no {WEIGHTS_FILE} (written by a run that could not consolidate "
                f"its weights); resume it on its own layout with optimizer states"
            )
        sd = load_file(str(ckpt / WEIGHTS_FILE))
        if experts_only:
            sd = {k: v for k, v in sd.items() if ".experts." in k}
        with torch.no_grad():
            res = load_full_state_dict(engine.module, sd, strict=False)
        module = engine.module
        tied = module.lm_head.weight is module.model.embed_tokens.weight
        bad = [k for k in res.missing_keys if not (experts_only or (tied and k == "lm_head.weight"))]
        if bad or res.unexpected_keys:
            raise CheckpointError(
                f"{ckpt / WEIGHTS_FILE} does not match the model: missing {bad[:5]}, "
                f"unexpected {res.unexpected_keys[:5]}"
            )
        if hasattr(engine.optimizer, "refresh_fp32_params"):  # ZeRO's fp32 copy; stage 0 has none
            engine.optimizer.refresh_fp32_params()

    def load(self, engine, ckpt: Path, *, optimizer: bool = True) -> dict:
        """Collective: weights, optimizer partitions and this rank's RNG from `ckpt`; returns the trainer
        state. optimizer=False: only the weights (from the consolidated file, so any layout can read them)
        with fresh AdamW moments. On another layout (world size or expert-parallel size) the optimizer
        states come from the checkpoint's portable state, if it has one. Check the state (model shape,
        world size) first: DeepSpeed's own errors on a mismatch are cryptic."""
        from parallel.checkpoint import _ep_position, has_portable, load_portable

        from .checkpoint_writer import SnapshotEngine

        if not isinstance(engine.checkpoint_engine, SnapshotEngine):
            self.install_safe_loading(engine)
        state = read_state(ckpt)
        saved_ep = state.get("config", {}).get("parallel", {}).get("expert_parallel_size", 1)
        same_layout = (state.get("world_size"), saved_ep) == (
            self.dist.world_size,
            _ep_position(engine.module)[1],
        )
        if not optimizer:
            self._load_weights(engine, ckpt, experts_only=False)
        elif not same_layout:
            if not has_portable(ckpt):
                raise CheckpointError(
                    f"{ckpt} was written by {state.get('world_size')} ranks (expert-parallel size {saved_ep}) "
                    f"without a portable optimizer state (checkpoint.portable=true); this run has "
                    f"{self.dist.world_size} (expert-parallel size {_ep_position(engine.module)[1]}). Resume on "
                    f"the same layout, or set checkpoint.load_optimizer_states=false"
                )
            step = load_portable(engine, ckpt)
            log.info(
                "%s: weights and Adam states (step %d) from its portable state, re-split over %d ranks",
                ckpt,
                step,
                self.dist.world_size,
            )
        else:
            self._load_deepspeed(engine, ckpt)
        rng = ckpt / "rng" / f"rank_{self.dist.rank:05d}.pt"
        if state.get("world_size") == self.dist.world_size and rng.is_file():
            set_rng_state(safe_load(rng), self.dist.device)  # our own file: plain tensors and numbers
        else:
            log.warning(
                "%s: no RNG state for rank %d of %d; keeping this run's seeds",
                ckpt,
                self.dist.rank,
                self.dist.world_size,
            )
        return state
