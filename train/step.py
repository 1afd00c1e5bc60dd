"""One optimizer step's parts: its statistics (reduced once over the ranks) and the micro-batch loop.

The statistics are named fields; `StepStats.reduce` is the one place they are packed into a single tensor
and all-reduced, so a step costs one host sync however many fields ride along.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from . import distributed as D
from .spikes import Spike


@dataclass
class StepStats:
    """Summed over the step's micro-batches on the device, then over the ranks (`reduce`)."""

    loss: torch.Tensor  # the back-propagated loss (mean over micro-batches and ranks after reduce)
    lm_loss: torch.Tensor  # (mean)
    aux: torch.Tensor  # router load-balancing loss (mean)
    z: torch.Tensor  # router z-loss (mean)
    layer_aux: torch.Tensor  # [MoE layers] load-balancing loss per MoE layer (mean)
    tokens_per_expert: torch.Tensor  # [MoE layers, experts] token slots routed to each expert (sum)
    stop: torch.Tensor  # ranks a stop signal reached (train/signals.py: StopRequest.agree)
    saved: torch.Tensor  # ranks whose background checkpoint write is done
    saved_bytes: torch.Tensor  # what they wrote

    MEANS = ("loss", "lm_loss", "aux", "z", "layer_aux")

    @classmethod
    def zeros(cls, moe_layers: int, experts: int, device: torch.device) -> StepStats:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(z(), z(), z(), z(), z(moe_layers), z(moe_layers, experts), z(), z(), z())

    def add(self, loss: torch.Tensor, out) -> None:
        """One micro-batch: `loss` is what was back-propagated, `out` the model's output."""
        self.loss += loss.detach()
        self.lm_loss += out.lm_loss.detach()
        if out.router_stats:
            self.aux += out.aux_loss.detach()
            self.z += out.z_loss.detach()
            for i, s in enumerate(out.router_stats):
                self.layer_aux[i] += s["aux_loss"].detach()
                self.tokens_per_expert[i] += s["tokens_per_expert"].detach()

    def reduce(self, micro_batches: int, world_size: int) -> StepStats:
        """Every field summed over the ranks in one all-reduce, on the CPU; the means divided."""
        names = [f.name for f in fields(self)]
        packed = D.all_reduce_(torch.cat([getattr(self, n).reshape(-1) for n in names])).cpu()
        out, at = {}, 0
        for n in names:
            like = getattr(self, n)
            out[n] = packed[at : at + like.numel()].view(like.shape)
            at += like.numel()
            if n in self.MEANS:
                out[n] = out[n] / (micro_batches * world_size)
        return StepStats(**out)


@dataclass
class StepEnd:
    """What a finished step hands to the callbacks; the same on every rank."""

    step: int  # optimizer steps so far, counted from 1
    stats: StepStats  # all-reduced
    lr: float
    grad_norm: float  # before clipping; inf/nan: no update was made
    spike: Spike | None
    seconds: float = 0.0  # wall time of the step (set by the loop)
    rollback: bool = False  # set by Spikes under policy rollback: Rollback restores, later callbacks skip


def forward_backward(
    engine,
    batches: Iterator,
    micro_batches: int,
    stats: StepStats,
    device: torch.device,
    micro_loss: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Every micro-batch of the step, forward and backward, its statistics added to `stats` (on the
    device: no sync). `micro_loss` may change the loss before it is back-propagated (faults)."""
    for micro in range(micro_batches):
        x, y = next(batches)
        out = engine(x.to(device, non_blocking=True), labels=y.to(device, non_blocking=True))
        loss = micro_loss(out.loss)
        engine.backward(loss)
        stats.add(loss, out)
        if micro < micro_batches - 1:
            engine.step()  # DeepSpeed counts micro-steps; the update happens at the boundary
