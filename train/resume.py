"""Which checkpoint a run continues from, and whether it may: a changed model shape is an error; so is a
changed world size or expert-parallel size with optimizer states, unless the checkpoint has a portable state
(checkpoint.portable=true); any other changed setting (LR, data path, batch size) is allowed and logged."""

from __future__ import annotations

import logging
from pathlib import Path

from parallel.checkpoint import has_portable

from .checkpoint import Checkpointer
from .checkpoint_layout import CheckpointError, read_state, resolve

log = logging.getLogger("train.resume")
# Keys that differ between a run and its continuation by design.
_EXPECTED_CHANGES = ("resume", "trainer.max_steps", "schedule.total_steps")


def find_checkpoint(resume: str, checkpointer: Checkpointer) -> Path | None:
    """`resume`: auto (the newest complete checkpoint of this run, if any), never, or a path."""
    own = checkpointer.latest()
    if resume == "auto":
        return own
    if resume == "never":
        if own is not None:
            raise CheckpointError(
                f"resume=never, but {checkpointer.root} already holds checkpoints (latest: "
                f"{own.name}); resume=auto continues that run, a new run_name starts a new one"
            )
        return None
    ckpt = resolve(resume)
    if own is not None and ckpt.parent.absolute() != checkpointer.root:
        own_step, step = read_state(own)["step"], read_state(ckpt)["step"]
        if own_step >= step:  # our saves would collide with (and could replace) this run's checkpoints
            raise CheckpointError(
                f"resume={resume} (step {step}) into {checkpointer.root}, which already holds "
                f"{own.name}; use a new run_name or checkpoint.dir"
            )
    return ckpt


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_compatible(
    ckpt: Path,
    state: dict,
    param_shapes: dict,
    model_config: dict,
    config: dict,
    global_batch: int,
    world_size: int,
) -> None:
    """Raise on a different model, or on optimizer partitions this layout cannot load; log every other
    difference from the checkpoint's config."""
    saved = state.get("param_shapes", {})
    if saved != param_shapes:
        diffs = [
            f"{k}: {saved.get(k)} -> {param_shapes.get(k)}"
            for k in sorted(set(saved) | set(param_shapes))
            if saved.get(k) != param_shapes.get(k)
        ]
        fields = [
            f"{k}: {v!r} -> {model_config.get(k)!r}"
            for k, v in state.get("model_config", {}).items()
            if k != "extra" and model_config.get(k) != v
        ]
        raise CheckpointError(
            f"{ckpt} holds another model ({len(diffs)} parameters differ, e.g. {'; '.join(diffs[:3])}). "
            f"Model config differences: {'; '.join(fields) or 'none'}. Resume needs the same model shape; "
            f"start a new run (run_name=...) to train a different model"
        )
    old, new = _flatten(state.get("config", {})), _flatten(config)
    layout = (state.get("world_size"), old.get("parallel.expert_parallel_size"))
    if (
        layout != (world_size, new.get("parallel.expert_parallel_size"))
        and new.get("checkpoint.load_optimizer_states")
        and not has_portable(ckpt)
    ):
        raise CheckpointError(
            f"{ckpt} was written by {layout[0]} ranks (expert-parallel size {layout[1]}); this run has {world_size} "
            f"(expert-parallel size {new.get('parallel.expert_parallel_size')}). DeepSpeed cannot re-partition "
            f"ZeRO optimizer states and this checkpoint has no portable state (saved with checkpoint.portable=true): "
            f"resume on the same layout, or set checkpoint.load_optimizer_states=false to "
            f"continue from the weights with fresh AdamW moments (step, data position and schedule carry over)"
        )
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            level = logging.INFO if key in _EXPECTED_CHANGES else logging.WARNING
            log.log(
                level,
                "resume: %s changed from %r to %r",
                key,
                old.get(key, "<unset>"),
                new.get(key, "<unset>"),
            )
    if state.get("global_batch_size") not in (None, global_batch):
        log.warning(
            "resume: the global batch changed from %s to %d sequences per step; data continues at the "
            "exact token position and samples are counted, the step-based LR schedule goes on from "
            "step %d",
            state["global_batch_size"],
            global_batch,
            state["step"],
        )
