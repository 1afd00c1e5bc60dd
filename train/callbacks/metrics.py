"""The step metrics (train/, moe/, spikes/, perf/, data/), logged every logging.interval steps and at the
job's first and last step. Their names are the ones docs/train.md lists."""

from __future__ import annotations

from ..step import StepEnd, StepStats
from ..throughput import memory_gb
from .base import Callback


class TrainMetrics(Callback):
    priority = 60

    def pre_train(self) -> None:
        self.first, self.busy, self.steps = self.trainer.step + 1, 0.0, 0

    def post_step(self, end: StepEnd) -> None:
        t, tc = self.trainer, self.trainer.cfg.trainer
        self.busy, self.steps = self.busy + end.seconds, self.steps + 1
        if not (t.step % t.cfg.logging.interval == 0 or t.step in (self.first, tc.max_steps)):
            return
        m = {
            "train/loss": float(end.stats.loss),
            "train/lm_loss": float(end.stats.lm_loss),
            "train/lr": end.lr,
            "train/grad_norm": end.grad_norm,
            "train/samples": t.samples,
            "train/tokens": t.tokens,
            "spikes/count": t.spikes.count,  # cumulative, so they chart
            "spikes/skipped": t.spikes.skipped,
            **self.moe_metrics(end.stats),
        }
        dt = self.busy / self.steps  # time in train steps only (not eval or checkpoints)
        tps = t.global_batch * t.cfg.data.seq_len / dt
        m.update(
            {
                "perf/step_time_s": dt,
                "perf/tokens_per_s": tps,
                "perf/eta_s": dt * (tc.max_steps - t.step),
                **memory_gb(t.dist.device),
            }
        )
        m.update({f"data/tokens/{k}": v for k, v in t.train_data.tokens_per_corpus().items()})
        flops = tps * t.flops_per_token / t.dist.world_size  # model FLOP/s per device
        m["perf/tflops_per_device"] = flops / 1e12
        if t.peak_flops:
            m["perf/mfu"] = flops / t.peak_flops
        t.metrics.log(t.step, m)
        self.busy, self.steps = 0.0, 0

    def moe_metrics(self, s: StepStats) -> dict:
        t = self.trainer
        L, E = len(t.moe_layers), t.model_cfg.num_experts
        if not L:
            return {}
        m = {"train/aux_loss": float(s.aux), "train/z_loss": float(s.z)}
        load = s.tokens_per_expert / s.tokens_per_expert.sum(1, keepdim=True).clamp(min=1)  # share of slots
        for i, layer in enumerate(t.moe_layers):
            m[f"moe/aux_loss/layer{layer}"] = float(s.layer_aux[i])
            m[f"moe/load_max/layer{layer}"] = float(load[i].max()) * E  # 1.0 = perfectly balanced
            if t.cfg.logging.expert_load:
                m.update({f"moe/load/layer{layer}/expert{e}": float(load[i, e]) for e in range(E)})
        return m
