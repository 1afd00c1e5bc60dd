"""The one-screen summary at the end of a run (rank 0): where it got, what it measured, where things are."""

from __future__ import annotations

import logging

from .metrics import WandbSink, _duration, val_sample

log = logging.getLogger("train")


def summary_lines(trainer, elapsed_s: float, start_step: int) -> list[str]:
    """Lines for the run `trainer` has just finished (or stopped): built from what it logged."""
    cfg, last = trainer.cfg, trainer.metrics.last
    steps = trainer.step - start_step
    how = "stopped by a signal" if trainer.stop.stopping else "finished"
    out = [
        f"run {cfg.run_name} {how} at step {trainer.step}/{cfg.trainer.max_steps}: {steps} steps in "
        f"{_duration(elapsed_s)} this job"
    ]
    if "train/loss" in last:
        step, loss = last["train/loss"]
        out.append(f"  train loss  {loss:.4f} (step {step})")
    if "val/loss" in last:
        step, loss = last["val/loss"]
        record = {k: v for k, (_, v) in last.items() if k.startswith("val/")}
        out.append(f"  val loss    {loss:.4f} (step {step}; {val_sample(record, trainer.dist.world_size)})")
    out.append(f"  tokens      {trainer.tokens:,} ({trainer.samples:,} sequences of {cfg.data.seq_len})")
    ckpt = trainer.checkpointer.latest()
    out.append(f"  checkpoint  {ckpt if ckpt is not None else 'none written'}")
    if ckpt is not None:
        out.append(
            f"              python -m train.eval {trainer.checkpointer.root}  (loss on the whole val split)"
        )
    out.append(f"  logs        {trainer.run_dir / 'train.log'}, config.yaml, layout.txt, metrics.jsonl")
    sinks = [getattr(s, "sink", s) for s in trainer.metrics.sinks]  # a DeferredSink holds the W&B one
    wandb = next((s for s in sinks if isinstance(s, WandbSink)), None)
    if wandb is not None:
        if getattr(wandb, "url", None):
            out.append(f"  W&B         {wandb.url}")
        upload = f"  (upload: wandb sync {wandb.dir})" if cfg.logging.wandb.mode.value == "offline" else ""
        out.append(f"  W&B files   {wandb.dir}{upload}")
    return out


def end_summary(trainer, elapsed_s: float, start_step: int) -> None:
    for line in summary_lines(trainer, elapsed_s, start_step):
        log.info("%s", line)
