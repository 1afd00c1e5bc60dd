"""Reading a checkpoint back into a DeepSpeed engine (resume, rollback, a weights-only start): DeepSpeed's
files on the same layout, the portable state on another, the consolidated weights alone without optimizer
states; `safe_load` reads every torch file without running pickled code. The layout: train/checkpoint_layout.py.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from parallel.checkpoint import expert_files, has_portable, load_local_experts, load_portable
from parallel.expert_parallel import load_full_state_dict
from parallel.topology import EPPosition
from parallel.zero import SAFE_GLOBALS

from .checkpoint_layout import WEIGHTS_FILE, CheckpointError, read_state, rng_file
from .distributed import Dist
from .rng import set_rng_state

log = logging.getLogger("train.checkpoint")


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


def load_checkpoint(engine, ckpt: Path, dist: Dist, *, optimizer: bool = True) -> dict:
    """Collective: weights, optimizer partitions and this rank's RNG from `ckpt`; returns the trainer
    state. optimizer=False: only the weights (from the consolidated file, so any layout can read them)
    with fresh AdamW moments. On another layout (world size or expert-parallel size) the optimizer
    states come from the checkpoint's portable state, if it has one. Check the state (model shape,
    world size) first: DeepSpeed's own errors on a mismatch are cryptic."""
    state = read_state(ckpt)
    saved_ep = state.get("config", {}).get("parallel", {}).get("expert_parallel_size", 1)
    same_layout = (state.get("world_size"), saved_ep) == (
        dist.world_size,
        dist.ep.size,
    )
    if not optimizer:
        _load_weights(engine, ckpt, dist.ep, experts_only=False)
    elif not same_layout:
        if not has_portable(ckpt):
            raise CheckpointError(
                f"{ckpt} was written by {state.get('world_size')} ranks (expert-parallel size {saved_ep}) "
                f"without a portable optimizer state (checkpoint.portable=true); this run has "
                f"{dist.world_size} (expert-parallel size {dist.ep.size}). Resume on "
                f"the same layout, or set checkpoint.load_optimizer_states=false"
            )
        step = load_portable(engine, dist.ep, ckpt)
        log.info(
            "%s: weights and Adam states (step %d) from its portable state, re-split over %d ranks",
            ckpt,
            step,
            dist.world_size,
        )
    else:
        _load_deepspeed(engine, ckpt, dist.ep)
    rng = rng_file(ckpt, dist.rank)
    if state.get("world_size") == dist.world_size and rng.is_file():
        set_rng_state(safe_load(rng), dist.device)  # our own file: plain tensors and numbers
    else:
        log.warning(
            "%s: no RNG state for rank %d of %d; keeping this run's seeds",
            ckpt,
            dist.rank,
            dist.world_size,
        )
    return state


def _load_deepspeed(engine, ckpt: Path, ep: EPPosition) -> None:
    """Same layout: DeepSpeed's files (dense weights, this rank's ZeRO partitions), then this rank's
    experts from our per-EP-position files. DeepSpeed's loader wants per-expert files in the layout of
    its own MoE layer, which its saver never writes for ours (its module file holds rank 0's experts
    only): it loads as a dense model."""
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
        _load_weights(engine, ckpt, ep, experts_only=False)  # the weights' only copy
        return
    if ep.size == 1:
        return
    if expert_files(ckpt):
        try:
            load_local_experts(engine.module, ep, ckpt)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt}: cannot read this rank's experts: {e}") from None
        if not engine.zero_load_from_fp32_weights():  # else ZeRO's fp32 masters are restored already
            engine.optimizer.refresh_fp32_params()
    else:  # a checkpoint from before the per-EP-position files
        _load_weights(engine, ckpt, ep, experts_only=True)


def _load_weights(engine, ckpt: Path, ep: EPPosition, experts_only: bool) -> None:
    """This rank's part of model_state.safetensors (its slice of every expert tensor under expert
    parallelism) into the module, then into the ZeRO optimizer's fp32 copy."""
    from safetensors.torch import load_file

    if not (ckpt / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{ckpt} has no {WEIGHTS_FILE} (written by a run that could not consolidate "
            f"its weights); resume it on its own layout with optimizer states"
        )
    sd = load_file(str(ckpt / WEIGHTS_FILE))
    if experts_only:
        sd = {k: v for k, v in sd.items() if ".experts." in k}
    with torch.no_grad():
        res = load_full_state_dict(engine.module, sd, ep, strict=False)
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
