"""The training loop: build, resume, then step until max_steps; all else is callbacks (train/callbacks/).

One optimizer step = `grad_accum_steps` micro-batches per rank. Its statistics are all-reduced once
(train/step.py), so every rank takes the same decisions (spike policy, stop signal, checkpoint commit).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from data import DataError
from jamba.counting import flops_per_token
from parallel.apply import apply_parallelism
from parallel.config import resolve_precision

from . import distributed as D
from .build import (
    build_data,
    build_engine,
    build_metrics,
    build_model,
    consolidated_state_dict,
    log_kernels,
    set_deterministic,
)
from .callbacks import default_callbacks
from .checkpoint import Checkpointer
from .checkpoint_layout import read_state
from .config import Config, SpikePolicy, to_container
from .optim import lr_multiplier, optimizer_step, set_lr
from .resume import check_compatible, find_checkpoint
from .show import log_layout, plural
from .signals import StopRequest, stop_agreed, where_stopped
from .spikes import Spike, SpikeDetector, largest_layer_grad_norm
from .step import StepEnd, StepStats, forward_backward
from .throughput import peak_flops
from .weights import start_from

log = logging.getLogger("train")


class Trainer:
    def __init__(self, cfg: Config, dist: D.Dist, stop: StopRequest | None = None) -> None:
        self.cfg, self.dist = cfg, dist
        self.stop = stop or StopRequest()  # train/__main__.py passes the one installed at start-up
        self.run_dir = Path(cfg.run_dir).absolute()
        torch.manual_seed(cfg.trainer.seed + dist.rank)
        self._was_deterministic = set_deterministic(cfg.trainer.deterministic)
        self.train_data, self.val_data = build_data(cfg.data, dist)
        td = self.train_data
        ids = {"bos_token_id": td.bos_id, "eos_token_id": td.eos_id, "pad_token_id": td.pad_id}
        self.precision = resolve_precision(cfg.parallel.precision, dist.device)
        self.model_cfg, model = build_model(cfg, td.vocab_size, ids, dist.device, self.precision)
        log_layout(self.model_cfg)
        log_kernels(model)
        self.param_shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self.moe_layers = [i for i, moe in enumerate(self.model_cfg.layers_is_moe) if moe]
        self.config = to_container(cfg)
        self.global_batch = cfg.data.micro_batch_size * cfg.trainer.grad_accum_steps * dist.world_size
        self.checkpointer = Checkpointer(cfg.checkpoint, dist, cfg.faults)
        resume_from = find_checkpoint(cfg.resume, self.checkpointer)
        if cfg.init_from:  # weights only, before the model is spread; the run's own checkpoint comes first
            start_from(cfg.init_from, model, self.model_cfg, cfg.resume, resume_from)
        if resume_from is not None:  # a different model is an error now, before DeepSpeed starts
            check_compatible(
                resume_from,
                read_state(resume_from),
                self.param_shapes,
                self.model_cfg.to_dict(),
                self.config,
                self.global_batch,
                dist.world_size,
            )
        apply_parallelism(model, cfg.parallel, dist)  # expert parallelism, checkpointing, compile
        log.info("starting the DeepSpeed engine (%s)", plural(dist.world_size, "rank"))
        self.engine, self.optimizer = build_engine(model, cfg, dist, self.precision)
        self.checkpointer.install_safe_loading(self.engine)
        self.spikes = SpikeDetector(cfg.spikes)
        self.step = self.samples = self.tokens = self.rollbacks = 0
        self.last_saved: int | None = None
        self.on_underway: Callable[[], None] | None = None  # set by fit
        self.wandb_id = uuid.uuid4().hex[:8]
        if resume_from is None:
            log.info("starting a new run in %s", self.run_dir)
        else:
            self._resume(resume_from)
        self.train_iter = iter(self.train_data)
        if cfg.logging.wandb.mode.value != "disabled":
            log.info("starting W&B (%s)", cfg.logging.wandb.mode.value)
        self.metrics = build_metrics(cfg, dist, self.config, self.model_cfg, self.wandb_id)
        self.callbacks = default_callbacks(self)
        self.flops_per_token = float(flops_per_token(self.model_cfg, cfg.data.seq_len)["total"])
        self.peak_flops = peak_flops(dist.device, cfg.logging.peak_tflops)
        n = sum(p.numel() for p in model.parameters())
        log.info(
            "model %s (%s): %.2fM parameters on this rank, %s, ZeRO-%d, %s, global batch %d x %d tokens",
            cfg.model.preset,
            self.model_cfg.pattern,
            n / 1e6,
            self.precision,
            self.engine.zero_optimization_stage(),
            plural(dist.world_size, "rank"),
            self.global_batch,
            cfg.data.seq_len,
        )

    # ---- resume and checkpoints ----------------------------------------------------------------------
    def _resume(self, ckpt: Path) -> None:
        state = self.checkpointer.load(self.engine, ckpt, optimizer=self.cfg.checkpoint.load_optimizer_states)
        self.set_state(state, data=True)
        self.last_saved = self.step if ckpt.parent.absolute() == self.checkpointer.root else None
        log.info("resumed from %s: step %d, %d samples", ckpt, self.step, self.samples)

    def set_state(self, state: dict, data: bool) -> None:
        self.step, self.samples, self.tokens = state["step"], state["samples"], state["tokens"]
        self.wandb_id = state.get("wandb_run_id") or self.wandb_id
        self.spikes.load_state_dict(state.get("spikes", {}))
        self.rollbacks = max(self.rollbacks, state.get("rollbacks", 0))
        if not data:
            return
        old_path = state.get("config", {}).get("data", {}).get("path")
        try:
            self.train_data.load_state_dict(state["data"])
        except ValueError as e:
            if old_path == self.cfg.data.path:
                raise DataError(f"cannot continue the data stream of the checkpoint: {e}") from None
            log.warning(
                "data.path changed from %s to %s and holds another corpus: reading it from its start",
                old_path,
                self.cfg.data.path,
            )

    def _state(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "data": self.train_data.state_dict(),
            "wandb_run_id": self.wandb_id,
            "config": self.config,
            "model_config": self.model_cfg.to_dict(),
            "param_shapes": self.param_shapes,
            "spikes": self.spikes.state_dict(),
            "rollbacks": self.rollbacks,
            "world_size": self.dist.world_size,
            "global_batch_size": self.global_batch,
            "precision": self.precision,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self) -> None:
        """Start a checkpoint of this step: training goes on while it is written (Checkpointer.start)."""
        if self.last_saved == self.step:
            return
        weights = consolidated_state_dict(self.engine.module, self.dist)
        mine = weights if self.dist.is_main else None  # None on every rank: experts saved per EP position
        state = self._state()
        if self.checkpointer.start(self.engine, self.step, state, mine, consolidated=weights is not None):
            self.last_saved = self.step  # else no room: said, and the next interval tries again

    def prepare_saves(self) -> None:
        """Collective, after this job's first step (the optimizer's states exist then): warn if keep_last
        checkpoints will not fit on the disk; on a GPU, pin the host buffers of the checkpoints in the
        background, so the first save does not wait for that."""
        if not (self.cfg.checkpoint.interval or self.cfg.checkpoint.save_final):
            return
        weights = consolidated_state_dict(self.engine.module, self.dist)
        mine = weights if self.dist.is_main else None
        self.checkpointer.prepare(self.engine, mine, consolidated=weights is not None)

    def finish_save(self) -> None:
        """Collective: wait for the checkpoint in flight, if any, and commit it."""
        if figures := self.checkpointer.wait():
            self.metrics.log(self.step, figures)

    # ---- one step ----------------------------------------------------------------------------------------
    def train_step(self) -> StepEnd:
        """One optimizer step; what it returns is the same on every rank (from all-reduced values)."""
        cfg, step = self.cfg, self.step + 1  # `step` counts optimizer steps from 1
        lr = cfg.optim.lr * lr_multiplier(self.step, cfg.schedule)
        set_lr(self.optimizer, lr)
        stats = StepStats.zeros(len(self.moe_layers), self.model_cfg.num_experts, self.dist.device)
        gas = cfg.trainer.grad_accum_steps
        micro_loss = functools.partial(self.callbacks.micro_loss, step)
        forward_backward(self.engine, self.train_iter, gas, stats, self.dist.device, micro_loss)
        stats.stop.fill_(self.stop.local())  # a signal on any rank stops every rank after this step
        if self.checkpointer.written():  # this rank's background checkpoint write is done
            stats.saved.fill_(1.0)
            stats.saved_bytes.fill_(float(self.checkpointer.writer.bytes))
        stats = stats.reduce(gas, self.dist.world_size)  # the step's one host sync
        # The verdict comes from all-reduced values: every rank skips, applies or rolls back alike.
        kind, threshold = self.spikes.check_loss(step, float(stats.loss))
        skip = kind == "nonfinite_loss" or (kind is not None and cfg.spikes.policy != SpikePolicy.log)
        layer = largest_layer_grad_norm(self.engine.module) if kind else None  # collective, before the update
        gnorm = optimizer_step(self.engine, self.optimizer, skip=skip, max_norm=cfg.optim.grad_clip)
        skip = skip or not math.isfinite(gnorm)  # inf/nan gradients: no update was made
        if kind is None and skip:
            kind = "nonfinite_grad"
        spike = Spike(kind, threshold, skip, layer) if kind else None
        self.step, self.samples = step, self.samples + self.global_batch
        self.tokens += self.global_batch * cfg.data.seq_len
        self.stop.agree(float(stats.stop))
        return StepEnd(step, stats, lr, gnorm, spike)

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, on_underway: Callable[[], None] | None = None) -> None:
        """Train to max_steps or an agreed stop; `on_underway` runs once this attempt's first step is done."""
        tc, self.fit_from, self.on_underway = self.cfg.trainer, self.step, on_underway
        if stop_agreed(self.stop, self.dist):  # a signal while the model was built or loaded: no step
            return
        if self.step >= tc.max_steps:
            log.info("already at step %d of trainer.max_steps=%d: nothing to do", self.step, tc.max_steps)
            return
        self.callbacks.pre_train()
        while self.step < tc.max_steps and not self.stop.stopping:
            self.callbacks.pre_step(self.step + 1)
            t0 = time.perf_counter()
            end = self.train_step()
            end.seconds = time.perf_counter() - t0
            self.callbacks.post_step(end)
        if self.stop.stopping and self.dist.is_main:
            log.warning("stop requested (a signal on some rank): saving step %d and exiting", self.step)
        self.callbacks.post_train()

    def stop_summary(self) -> str | None:
        """Where a stop signal left the run (None: no stop); after `fit`."""
        if not self.stop.stopping:
            return None
        return where_stopped(self.stop, self.step, self.fit_from, self.checkpointer.latest())

    def close(self) -> None:
        self.metrics.close()
        torch.use_deterministic_algorithms(self._was_deterministic)
