"""The checkpoint layout: every file name, how a checkpoint is found and when it is complete. Plain files and
JSON only (no torch), so whatever reads a checkpoint (resume, train.eval, jamba.export, launch.report,
launch.sweep) names its files from here.

Layout of <checkpoint.dir>:
    latest                      tag of the newest complete checkpoint (DeepSpeed's convention), replaced atomically
    step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt     DeepSpeed: optimizer states (the module
                                    entry is a marker: every tensor is written once, the weights below)
        rng/rank_00000.pt ...   each rank's RNG states (plain tensors)
        model_state.safetensors, model_config.json   the whole model: resume, jamba.export and train.eval read it
        experts_ep<r>.safetensors   only without consolidated weights: EP position r's experts (parallel/checkpoint.py)
        portable/                   checkpoint.portable=true: full fp32 masters + Adam moments per parameter
                                    (experts per EP position; parallel/checkpoint.py), for a resume on another
                                    world / EP size
        trainer_state.json      step, samples, data-loader state, W&B run id, resolved config, param shapes

A checkpoint is complete iff it holds trainer_state.json: the save writes it last (train/checkpoint.py), so a
process killed at any moment of a save leaves `latest` on the previous complete checkpoint; the partial
directory is ignored here and removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("train.checkpoint")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model_state.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
LATEST = "latest"
RNG_DIR = "rng"
STATE_VERSION = 1
TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, incomplete, unreadable, of another model); the message
    says why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG_DIR / f"rank_{rank:05d}.pt"


def is_complete(d: Path) -> bool:
    return (d / STATE_FILE).is_file()


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_N directory under root, complete or not, by step."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := TAG.match(p.name)) and p.is_dir())


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if TAG.fullmatch(tag) and is_complete(root / tag):  # a step_N child: never a path out of root
            return root / tag
        log.warning(
            "%s names %r, which is not a complete step_N checkpoint in it; looking for the newest complete one",
            pointer,
            tag[:100],
        )
    done = [p for _, p in step_dirs(root) if is_complete(p)]
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a checkpoint root (then its latest complete checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return p
    if p.is_dir() and (found := find_latest(p)) is not None:
        return found
    if p.is_dir() and TAG.match(p.name):
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


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)
