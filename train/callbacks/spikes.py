"""The spike policy (train/spikes.py judges): log the event, skip the update (decided before it, in the
step), or roll back to the newest checkpoint, keeping the data position past the offending batch."""

from __future__ import annotations

import logging

from ..checkpoint_layout import read_state
from ..config import SpikePolicy
from ..spikes import ACTION_CODES, KIND_CODES, POLICY_CODES
from ..step import StepEnd
from .base import Callback

log = logging.getLogger("train")


class Spikes(Callback):
    priority = 70

    def post_step(self, end: StepEnd) -> None:
        t, spike = self.trainer, end.spike
        if spike is None:
            t.spikes.accept(float(end.stats.loss))
            return
        policy = t.cfg.spikes.policy
        t.spikes.count += 1
        t.spikes.skipped += int(spike.skipped)
        rollback = policy == SpikePolicy.rollback and t.checkpointer.latest() is not None
        action = "rolled_back" if rollback else "skipped" if spike.skipped else "applied"
        fields = {
            "spike/kind": spike.kind,
            "spike/kind_code": KIND_CODES[spike.kind],
            "spike/loss": float(end.stats.loss),
            "spike/threshold": spike.threshold,
            "spike/grad_norm": end.grad_norm,
            "spike/policy": policy.value,
            "spike/policy_code": POLICY_CODES[policy.value],
            "spike/count": t.spikes.count,
            "spike/action": action,
            "spike/action_code": ACTION_CODES[action],
        }
        if spike.layer is not None:
            fields["spike/max_layer"], fields["spike/max_layer_grad_norm"] = spike.layer
        t.metrics.event("spike", t.step, **fields)
        end.rollback = policy == SpikePolicy.rollback


class Rollback(Callback):
    """After the step's metrics are logged: restore the newest checkpoint (weights, optimizer, step counters)
    but keep the data position. The callbacks after this one skip the step."""

    priority = 50

    def post_step(self, end: StepEnd) -> None:
        if not end.rollback:
            return
        t = self.trainer
        t.finish_save()  # the newest checkpoint may still be in flight
        ckpt = t.checkpointer.latest()
        if ckpt is None:
            log.warning("spike policy rollback: no checkpoint yet, the update was skipped instead")
            return
        t.rollbacks += 1
        if t.rollbacks > t.cfg.spikes.max_rollbacks:
            raise RuntimeError(
                f"{t.rollbacks} rollbacks (spikes.max_rollbacks={t.cfg.spikes.max_rollbacks}): "
                f"the spikes persist; lower optim.lr or inspect the data near step {t.step}"
            )
        failed_step, counts = t.step, (t.spikes.count, t.spikes.skipped)
        state = read_state(ckpt)  # written by this layout, unless the run resumed on a new one since
        t.checkpointer.load(t.engine, ckpt, optimizer=state.get("world_size") == t.dist.world_size)
        t.set_state(state, data=False)
        (t.spikes.count, t.spikes.skipped), t.last_saved = counts, t.step
        t.metrics.event(
            "rollback", failed_step, **{"rollback/to_step": t.step, "rollback/count": t.rollbacks}
        )
