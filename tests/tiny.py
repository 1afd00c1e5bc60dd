"""The one tiny Jamba of the tests: `tiny_config(**changes)` builds it as a JambaConfig, `TINY` is the same
model as `python -m train` overrides, with a batch small enough that start-up dominates a run.

4 layers: Mamba, Mamba + MoE, attention, Mamba + MoE ("MME*ME"), 4 experts, top-2. A test changes what it
needs (`tiny_config(vocab_size=259, num_experts=1)`), so what it depends on is written where it is used."""

from __future__ import annotations

from jamba import JambaConfig

TINY_MODEL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    attn_layer_period=4,
    attn_layer_offset=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    mamba_d_state=8,
)


def tiny_config(**changes) -> JambaConfig:
    return JambaConfig(**{**TINY_MODEL, **changes})


# The byte corpus has 259 token ids; a wider feed-forward than TINY_MODEL's (the runs' losses were tuned on it).
TINY = [
    *(f"model.{k}={v}" for k, v in {**TINY_MODEL, "vocab_size": 259, "intermediate_size": 64}.items()),
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "schedule.warmup_steps=2",
    "trainer.eval_batches=2",
    "logging.interval=1",
    "logging.wandb.mode=disabled",
    "logging.peak_tflops=1.0",
]
