"""The training loop: build, resume, then step / evaluate / log / checkpoint until max_steps.

One optimizer step = `grad_accum_steps` micro-batches per rank. Its loss and router statistics are
all-reduced in one small tensor, so every rank takes the same decisions (spike policy, stop signal).
"""

from __future__ import annotations

import logging
import math
import os
import signal
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
from .checkpoint import Checkpointer
from .checkpoint_layout import CheckpointError, read_state
from .config import Config, SpikePolicy, to_container
from .eval import loss_sums
from .optim import clip_grad_norm_, lr_multiplier, set_lr
from .profiling import profile_step
from .progress import progress
from .resume import check_compatible, find_checkpoint
from .show import log_layout, plural, write_run_files
from .signals import StopRequest, stop_agreed, where_stopped
from .spikes import (
    ACTION_CODES,
    KIND_CODES,
    POLICY_CODES,
    SpikeDetector,
    is_finite,
    largest_layer_grad_norm,
)
from .summary import end_summary
from .throughput import memory_gb, peak_flops
from .weights import start_from

log = logging.getLogger("train")
HEAD = 7  # slots of the step statistics before the per-layer ones (see _forward_backward)


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
        self.wandb_id = uuid.uuid4().hex[:8]
        self.rollback_requested = False
        self.faulted_steps: set[int] = set()
        if resume_from is None:
            log.info("starting a new run in %s", self.run_dir)
        else:
            self._resume(resume_from)
        self.train_iter = iter(self.train_data)
        if cfg.logging.wandb.mode.value != "disabled":
            log.info("starting W&B (%s)", cfg.logging.wandb.mode.value)
        self.metrics = build_metrics(cfg, dist, self.config, self.model_cfg, self.wandb_id)
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
        self._set_state(state, data=True)
        self.last_saved = self.step if ckpt.parent.absolute() == self.checkpointer.root else None
        log.info("resumed from %s: step %d, %d samples", ckpt, self.step, self.samples)

    def _set_state(self, state: dict, data: bool) -> None:
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
        if self.last_saved == self.step:
            return
        """Start a checkpoint of this step: training goes on while it is written (Checkpointer.start)."""
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

    def _rollback(self) -> None:
        """Restore the newest checkpoint but keep the data position (past the offending batch)."""
        self.finish_save()  # the newest checkpoint may still be in flight
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            log.warning("spike policy rollback: no checkpoint yet, the update was skipped instead")
            return
        self.rollbacks += 1
        if self.rollbacks > self.cfg.spikes.max_rollbacks:
            raise RuntimeError(
                f"{self.rollbacks} rollbacks (spikes.max_rollbacks={self.cfg.spikes.max_rollbacks}): "
                f"the spikes persist; lower optim.lr or inspect the data near step {self.step}"
            )
        failed_step, counts = self.step, (self.spikes.count, self.spikes.skipped)
        state = read_state(ckpt)  # written by this layout, unless the run resumed on a new one since
        self.checkpointer.load(self.engine, ckpt, optimizer=state.get("world_size") == self.dist.world_size)
        self._set_state(state, data=False)
        (self.spikes.count, self.spikes.skipped), self.last_saved = counts, self.step
        self.metrics.event(
            "rollback", failed_step, **{"rollback/to_step": self.step, "rollback/count": self.rollbacks}
        )

    # ---- one step ----------------------------------------------------------------------------------------
    def _micro_loss(self, out, step: int) -> torch.Tensor:
        """The loss to back-propagate; injected faults fire on a step's first attempt only (not after a rollback)."""
        loss, f = out.loss, self.cfg.faults
        if step not in self.faulted_steps:
            if step in f.loss_spike_steps:
                loss = loss * f.loss_spike_scale
            if step in f.nan_loss_steps:
                loss = loss * float("nan")
        return loss

    def _forward_backward(self, step: int) -> torch.Tensor:
        """Every micro-batch of the step, forward and backward; returns the all-reduced statistics
        [loss, lm_loss, aux, z, stop, saved, saved_bytes | aux per MoE layer | tokens per expert per MoE layer],
        on the CPU (saved: ranks whose background checkpoint write is done; saved_bytes: what they wrote)."""
        H = HEAD
        # They accumulate on the device, so there is one sync per step.
        gas, L, E = self.cfg.trainer.grad_accum_steps, len(self.moe_layers), self.model_cfg.num_experts
        acc = torch.zeros(H + L + L * E, dtype=torch.float64, device=self.dist.device)
        for micro in range(gas):
            x, y = next(self.train_iter)
            dev = self.dist.device
            out = self.engine(x.to(dev, non_blocking=True), labels=y.to(dev, non_blocking=True))
            loss = self._micro_loss(out, step)
            self.engine.backward(loss)
            acc[0] += loss.detach()
            acc[1] += out.lm_loss.detach()
            if out.router_stats:
                acc[2] += out.aux_loss.detach()
                acc[3] += out.z_loss.detach()
                for i, s in enumerate(out.router_stats):
                    acc[H + i] += s["aux_loss"].detach()
                    acc[H + L + i * E : H + L + (i + 1) * E] += s["tokens_per_expert"].detach()
            if micro < gas - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; the update happens at the boundary
        self.faulted_steps.add(step)
        acc[4] = self.stop.local()  # a signal on any rank stops every rank after this step
        if self.checkpointer.written():
            acc[5], acc[6] = 1.0, float(self.checkpointer.writer.bytes)
        acc = D.all_reduce_(acc).cpu()
        acc[:4] /= gas * self.dist.world_size
        acc[H : H + L] /= gas * self.dist.world_size
        return acc

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (the same on every rank)."""
        cfg, step = self.cfg, self.step + 1  # `step` counts optimizer steps from 1
        if cfg.faults.die_at_step == step:
            # a crash after the newest checkpoint was committed (every rank waits for it: deterministic for
            # tests; a kill during the background write is faults.kill_during_save_phase)
            self.finish_save()
        if cfg.faults.die_at_step == step and self.dist.rank == cfg.faults.die_rank:
            log.error("faults.die_at_step=%d: rank %d exits abruptly", step, self.dist.rank)
            os._exit(17)
        if cfg.faults.signal_at_step == step and self.dist.rank == cfg.faults.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank only: the stop must still be agreed
        lr = cfg.optim.lr * lr_multiplier(self.step, cfg.schedule)
        set_lr(self.optimizer, lr)
        acc = self._forward_backward(step)
        loss = float(acc[0])
        # The verdict comes from all-reduced values: every rank skips, applies or rolls back alike.
        kind, threshold = self.spikes.check_loss(step, loss)
        skip = kind == "nonfinite_loss" or (kind is not None and cfg.spikes.policy != SpikePolicy.log)
        layer = largest_layer_grad_norm(self.engine.module) if kind else None
        clip_norm = None
        # one rank runs stage 0 (parallel.zero.effective_zero_stage): clip here, where the norm is kept. No expert
        # parallelism on one rank, so torch's foreach clipping is the whole norm.
        if not self.engine.zero_optimization():
            clip_norm = clip_grad_norm_(self.optimizer, self.engine.module.parameters(), cfg.optim.grad_clip)
            if not is_finite(clip_norm):
                skip = True  # as ZeRO does: no update from inf/nan gradients
        self.optimizer.skip = skip
        self.engine.step()
        self.optimizer.skip = False
        gnorm = self.engine.get_global_grad_norm() if clip_norm is None else clip_norm
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        if kind is None and not is_finite(gnorm):
            kind, skip = "nonfinite_grad", True  # inf/nan gradients: the optimizer did not step
        self.step, self.samples = step, self.samples + self.global_batch
        self.tokens += self.global_batch * cfg.data.seq_len
        self.stop.agree(float(acc[4]))
        if (
            self.checkpointer.in_flight and int(acc[5]) == self.dist.world_size
        ):  # every rank's files are written
            self.metrics.log(self.step, self.checkpointer.commit(float(acc[6])))
        if kind is None:
            self.spikes.accept(loss)
        else:
            self._on_spike(kind, loss, threshold, gnorm, layer, skip)
        m = {
            "train/loss": loss,
            "train/lm_loss": float(acc[1]),
            "train/lr": lr,
            "train/grad_norm": gnorm,
            "train/samples": self.samples,
            "train/tokens": self.tokens,
            "spikes/count": self.spikes.count,  # cumulative, so they chart
            "spikes/skipped": self.spikes.skipped,
        }
        return {**m, **self._moe_metrics(acc)}

    def _moe_metrics(self, acc: torch.Tensor) -> dict:
        L, E = len(self.moe_layers), self.model_cfg.num_experts
        if not L:
            return {}
        m = {"train/aux_loss": float(acc[2]), "train/z_loss": float(acc[3])}
        load = acc[HEAD + L :].view(L, E)
        load = load / load.sum(1, keepdim=True).clamp(min=1)  # fraction of the layer's token slots
        for i, layer in enumerate(self.moe_layers):
            m[f"moe/aux_loss/layer{layer}"] = float(acc[HEAD + i])
            m[f"moe/load_max/layer{layer}"] = float(load[i].max()) * E  # 1.0 = perfectly balanced
            if self.cfg.logging.expert_load:
                m.update({f"moe/load/layer{layer}/expert{e}": float(load[i, e]) for e in range(E)})
        return m

    def _on_spike(self, kind: str, loss: float, threshold, gnorm: float, layer, skipped: bool) -> None:
        policy = self.cfg.spikes.policy
        self.spikes.count += 1
        self.spikes.skipped += int(skipped)
        rollback = policy == SpikePolicy.rollback and self.checkpointer.latest() is not None
        action = "rolled_back" if rollback else "skipped" if skipped else "applied"
        fields = {
            "spike/kind": kind,
            "spike/kind_code": KIND_CODES[kind],
            "spike/loss": loss,
            "spike/threshold": threshold,
            "spike/grad_norm": gnorm,
            "spike/policy": policy.value,
            "spike/policy_code": POLICY_CODES[policy.value],
            "spike/count": self.spikes.count,
            "spike/action": action,
            "spike/action_code": ACTION_CODES[action],
        }
        if layer is not None:
            fields["spike/max_layer"], fields["spike/max_layer_grad_norm"] = layer
        self.metrics.event("spike", self.step, **fields)
        self.rollback_requested = policy == SpikePolicy.rollback

    # ---- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_data is None:
            return {}
        self.engine.eval()
        eb = self.cfg.trainer.eval_batches
        with progress(f"evaluating {'the whole val split' if not eb else f'{eb} batches'}") as tick:
            loss_sum, n, batches, early = loss_sums(self.engine, self.val_data, eb, self.dist.device, tick)
        self.engine.train()
        # loss x tokens, tokens, batches, ranks that stopped early
        total = D.all_reduce_(torch.tensor([loss_sum, n, batches, float(early)], dtype=torch.float64))
        loss = float(total[0] / total[1].clamp(min=1))
        return {
            "val/loss": loss,
            "val/ppl": math.exp(min(loss, 50.0)),
            "val/tokens": int(total[1]),
            "val/batches": int(total[2]),  # over all ranks
            "val/whole_split": int(total[3] == 0),  # every rank read its whole val share
        }

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, on_underway: Callable[[], None] | None = None) -> None:
        """Train to max_steps or an agreed stop; `on_underway` runs once this attempt's first step is done."""
        cfg, tc, self.fit_from = self.cfg, self.cfg.trainer, self.step
        if stop_agreed(self.stop, self.dist):  # a signal while the model was built or loaded: no step
            return
        if self.step >= tc.max_steps:
            log.info("already at step %d of trainer.max_steps=%d: nothing to do", self.step, tc.max_steps)
            return
        busy, steps, first, evaluated = 0.0, 0, self.step + 1, False
        started = time.perf_counter()
        while self.step < tc.max_steps and not self.stop.stopping:
            # logging.profile_step: rank 0 records this one step (writing the files is not timed)
            with profile_step(
                cfg.logging.profile_step, self.step + 1, self.dist.is_main, self.dist.device, self.run_dir
            ):
                t0 = time.perf_counter()
                m = self.train_step()
                step_s = time.perf_counter() - t0
            busy, steps = busy + step_s, steps + 1
            if self.step == first:
                self.prepare_saves()
                if on_underway is not None:
                    on_underway()
                if self.dist.is_main:  # the attempt is underway: keep what it trains beside its log
                    write_run_files(self.run_dir, self.config, self.model_cfg)
            if self.step % cfg.logging.interval == 0 or self.step in (first, tc.max_steps):
                dt = busy / steps  # time in train steps only (not eval or checkpoints)
                tps = self.global_batch * cfg.data.seq_len / dt
                m.update(
                    {
                        "perf/step_time_s": dt,
                        "perf/tokens_per_s": tps,
                        "perf/eta_s": dt * (tc.max_steps - self.step),
                        **memory_gb(self.dist.device),
                    }
                )
                m.update({f"data/tokens/{k}": v for k, v in self.train_data.tokens_per_corpus().items()})
                flops = tps * self.flops_per_token / self.dist.world_size  # model FLOP/s per device
                m["perf/tflops_per_device"] = flops / 1e12
                if self.peak_flops:
                    m["perf/mfu"] = flops / self.peak_flops
                self.metrics.log(self.step, m)
                busy, steps = 0.0, 0
            if self.rollback_requested:
                self.rollback_requested = False
                self._rollback()
                continue
            evaluated = bool(tc.eval_interval) and self.step % tc.eval_interval == 0
            if evaluated:
                self._log_eval()
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
        if self.stop.stopping:
            if self.dist.is_main:
                log.warning("stop requested (a signal on some rank): saving step %d and exiting", self.step)
        elif not evaluated:
            self._log_eval()
        if cfg.checkpoint.save_final or self.stop.stopping:
            self.save()
        self.finish_save()
        if self.dist.is_main:
            end_summary(self, time.perf_counter() - started, first - 1)
        if cfg.checkpoint.save_final and self.last_saved != self.step and not self.stop.stopping:
            raise CheckpointError(f"the final checkpoint was not saved: {self.checkpointer.no_room}")

    def stop_summary(self) -> str | None:
        """Where a stop signal left the run (None: no stop); after `fit`."""
        if not self.stop.stopping:
            return None
        return where_stopped(self.stop, self.step, self.fit_from, self.checkpointer.latest())

    def _log_eval(self) -> None:
        if m := self.evaluate():
            self.metrics.log(self.step, m)

    def close(self) -> None:
        self.metrics.close()
        torch.use_deterministic_algorithms(self._was_deterministic)
