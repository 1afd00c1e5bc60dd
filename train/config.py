"""Structured configs: one dataclass per component, the schema Hydra validates `conf/` and overrides against.

Every YAML in conf/ and every command-line override is merged into `Config` in struct mode, so an
unknown key or a value of the wrong type is an error before any process group or tensor exists.
Range checks that a type cannot express live in each section's `validate()`, run by `to_config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from jamba import JambaConfig, get_preset
from jamba.config import CHECKPOINT_CHOICES

from .config_check import unknown_keys


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ---- model -----------------------------------------------------------------------------------------
# `model.preset` names a flavor of jamba/presets.py; every JambaConfig field may be overridden
# (`model.hidden_size=256`); None means "the preset's value". The schema is generated from JambaConfig
# so the two never disagree. activation_checkpointing belongs to `parallel`, `extra` is bookkeeping.
_MODEL_SKIP = ("activation_checkpointing", "extra")


def _optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Any  # e.g. mamba_dt_rank: int | "auto"
    return tp if tp is Any else Optional[tp]  # noqa: UP045 - make_dataclass needs a runtime type


_hints = typing.get_type_hints(JambaConfig)
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig",
    [("preset", str, field(default="debug"))]
    + [
        (f.name, _optional(_hints[f.name]), field(default=None))
        for f in dataclasses.fields(JambaConfig)
        if f.name not in _MODEL_SKIP
    ],
)
ModelConfig.__doc__ = "A jamba/ preset plus per-field overrides (None: the preset's value)."


def build_model_config(model: Any, activation_checkpointing: str = "none") -> JambaConfig:
    """The JambaConfig a `ModelConfig` describes; JambaConfig's own validation names a bad field."""
    overrides = {k: v for k, v in dataclasses.asdict(model).items() if k != "preset" and v is not None}
    try:
        return get_preset(model.preset, activation_checkpointing=activation_checkpointing, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


# ---- optimizer and schedule ------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """AdamW; no weight decay on norms, biases, A_log, D (see parallel/zero.py)."""

    lr: float = 3e-4  # peak learning rate (the schedule scales it)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay (matrices and embeddings only)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _need(self.weight_decay >= 0 and self.grad_clip >= 0, "optim.weight_decay/grad_clip", "must be >= 0")


class Schedule(Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr at total_steps
    wsd = "wsd"  # warmup-stable-decay: linear warmup, constant, linear decay over the last decay_fraction
    constant = "constant"  # linear warmup, then constant


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: a multiplier of optim.lr per optimizer step."""

    name: Schedule = Schedule.cosine  # the schedule's shape
    warmup_steps: int = 100  # linear warmup from 0 over these steps
    total_steps: int = "${trainer.max_steps}"  # type: ignore[assignment]  # the decay's end
    min_lr_ratio: float = 0.1  # the final LR as a fraction of optim.lr (cosine, wsd)
    decay_fraction: float = 0.2  # wsd only

    def validate(self) -> None:
        _need(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _need(self.total_steps >= 1, "schedule.total_steps", "must be >= 1")
        _need(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        _need(0 < self.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1]")


# ---- parallelism -----------------------------------------------------------------------------------
class Precision(Enum):
    auto = "auto"  # bf16 on a GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"  # DeepSpeed torch_autocast: fp32 weights (A_log, D, dt bias stay fp32), bf16 matmuls


@dataclass
class ParallelConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO 1 (optimizer states) or 2 (+ gradients) over data-parallel ranks
    expert_parallel_size: int = 1  # ranks that split each MoE layer's experts (parallel/expert_parallel.py)
    precision: Precision = Precision.auto
    activation_checkpointing: str = "none"  # none | full | mamba | attention | moe
    # torch.compile each decoder layer: auto = on a GPU only (CPU compiles take minutes for little gain)
    compile: str = "auto"  # auto | layers | none
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | nccl | gloo
    timeout_s: int = 600  # a collective waiting longer (e.g. a peer died) raises instead of hanging

    def validate(self) -> None:
        _need(
            self.zero_stage in (1, 2),
            "parallel.zero_stage",
            f"must be 1 or 2, got {self.zero_stage} (train/ uses ZeRO-1/2; stage 1 costs nothing over DDP)",
        )
        _need(self.expert_parallel_size >= 1, "parallel.expert_parallel_size", "must be >= 1")
        _need(
            self.activation_checkpointing in CHECKPOINT_CHOICES,
            "parallel.activation_checkpointing",
            f"must be one of {CHECKPOINT_CHOICES}, got {self.activation_checkpointing!r}",
        )
        _need(
            self.compile in ("auto", "layers", "none"),
            "parallel.compile",
            f"auto|layers|none, got {self.compile!r}",
        )
        _need(
            self.device in ("auto", "cpu", "cuda"), "parallel.device", f"auto|cpu|cuda, got {self.device!r}"
        )
        _need(
            self.backend in ("auto", "nccl", "gloo"),
            "parallel.backend",
            f"auto|nccl|gloo, got {self.backend!r}",
        )
        _need(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")


# ---- logging, checkpoints, spikes ----------------------------------------------------------------------
class WandbMode(Enum):
    offline = "offline"  # default: no account or network needed; `wandb sync <dir>` uploads later
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    """Weights & Biases: offline by default (no account), files under <run_dir>/wandb."""

    mode: WandbMode = WandbMode.offline  # offline: `wandb sync` uploads later
    project: str = "jamba"  # W&B project
    entity: str | None = None  # W&B team or user (None: your default)
    group: str | None = None  # W&B run group (sweeps set it)
    tags: list[str] = field(default_factory=list)  # W&B run tags


@dataclass
class LoggingConfig:
    """Metrics: the console line, <run_dir>/metrics.jsonl and W&B (rank 0)."""

    interval: int = 10  # steps between metric records (spike events are logged when they happen)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    jsonl: bool = True  # <run_dir>/metrics.jsonl
    expert_load: bool = True  # fraction of tokens per expert per MoE layer
    peak_tflops: float | None = None  # per device, for MFU; None: a known GPU's, or measured GEMM rate on CPU
    # > 0: rank 0 records this optimizer step with torch.profiler: <run_dir>/profile_step<N>.txt and .json
    profile_step: int = 0

    def validate(self) -> None:
        _need(self.interval >= 1, "logging.interval", "must be >= 1")
        _need(
            self.profile_step >= 0, "logging.profile_step", f"must be >= 0 (0: off), got {self.profile_step}"
        )


@dataclass
class CheckpointConfig:
    """Atomic checkpoints, written in the background (train/checkpoint.py)."""

    dir: str = "${run_dir}/checkpoints"  # where step_N folders and `latest` go
    interval: int = 500  # steps between checkpoints; 0: only the final one
    keep_last: int = 3  # newest checkpoints kept (>= 1)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    save_final: bool = True  # a checkpoint at the last step
    # False: resume from the weights with fresh AdamW moments, e.g. on another number of ranks (DeepSpeed
    # cannot re-partition ZeRO-1/2 optimizer states); step, data position and schedule still carry over.
    load_optimizer_states: bool = True
    # Also write a topology-free optimizer state (full fp32 masters + Adam moments per parameter, experts by
    # global id; parallel/checkpoint.py): a resume on another world size or expert-parallel size then keeps
    # the optimizer states. Costs another 12 bytes per parameter on disk and a gather per parameter at save.
    portable: bool = False
    # Load DeepSpeed's files with torch.load(weights_only=True) plus an allow-list of its plain data classes.
    # Set false only for a checkpoint you trust that needs more (it then may run pickled code).
    weights_only: bool = True

    def validate(self) -> None:
        _need(self.interval >= 0 and self.keep_every >= 0, "checkpoint.interval/keep_every", "must be >= 0")
        _need(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the one `latest` points at)")


class SpikePolicy(Enum):
    log = "log"  # record the spike, apply the update (non-finite gradients are never applied)
    skip_batch = "skip_batch"  # no update for the step
    rollback = "rollback"  # restore the last checkpoint, keep reading data after the offending batch


@dataclass
class SpikeConfig:
    """Loss-spike detection and what a spike does (train/spikes.py)."""

    policy: SpikePolicy = SpikePolicy.log  # what a detected spike does
    start_step: int = "${schedule.warmup_steps}"  # type: ignore[assignment]  # no verdicts before
    window: int = 50  # running statistics over the last `window` accepted step losses
    min_history: int = 10  # accepted steps before the first verdict
    sigmas: float = 6.0  # spike: loss > mean + max(sigmas * std, min_jump * mean)
    min_jump: float = 0.1  # smallest relative jump that counts as a spike
    max_rollbacks: int = (
        3  # more than this many rollbacks in one run is an error (the data or LR is the cause)
    )

    def validate(self) -> None:
        _need(
            self.window >= 2 and 2 <= self.min_history <= self.window,
            "spikes.window/min_history",
            "need 2 <= min_history <= window",
        )
        _need(self.sigmas > 0 and self.min_jump >= 0, "spikes.sigmas/min_jump", "sigmas > 0, min_jump >= 0")


@dataclass
class FaultConfig:
    """Deliberate failures, to test and drill the recovery paths. Leave empty in real runs."""

    loss_spike_steps: list[int] = field(default_factory=list)  # multiply the loss by loss_spike_scale
    loss_spike_scale: float = 10.0  # the factor of loss_spike_steps
    nan_loss_steps: list[int] = field(default_factory=list)  # make the loss NaN
    kill_during_save_step: int = 0  # SIGKILL this process while the checkpoint of this step is written
    # when: write (after the background writer's first file) | written (its files done, before the commit) |
    # state (rank 0: after trainer_state.json, before `latest`)
    kill_during_save_phase: str = "write"
    die_at_step: int = 0  # rank `die_rank` exits abruptly at the start of this step
    die_rank: int = 0  # the rank that dies at die_at_step
    signal_at_step: int = 0  # rank `signal_rank` sends itself SIGTERM during this step (every rank must stop)
    signal_rank: int = 0  # the rank signalled at signal_at_step


# ---- the run -----------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """The loop: steps, accumulation, seed, evaluation."""

    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step and rank
    seed: int = 1234  # model init (same on every rank) and torch RNG (seed + rank)
    eval_interval: int = 100  # steps between validation passes; 0: only at the end
    eval_batches: int = 10  # micro-batches per rank per validation pass; 0: the whole val split
    # bitwise repeatable GPU runs: torch's deterministic algorithms, our Triton scan (auto) and PyTorch's conv
    # in place of the atomics of mamba-ssm's scan and causal-conv1d's backward (docs/train.md: what it costs)
    deterministic: bool = False

    def validate(self) -> None:
        _need(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        _need(
            self.grad_accum_steps >= 1,
            "trainer.grad_accum_steps",
            f"must be >= 1, got {self.grad_accum_steps}",
        )
        _need(
            self.eval_interval >= 0 and self.eval_batches >= 0,
            "trainer.eval_interval/eval_batches",
            "must be >= 0",
        )


@dataclass
class Config:
    """Everything a run reads; `python -m train --help` lists it."""

    model: ModelConfig = field(default_factory=ModelConfig)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_name: str = "${model.preset}"  # the run folder's name under runs/ (a plain name)
    run_dir: str = "runs/${run_name}"  # the same on every rank: no timestamps (see docs/train.md)
    resume: str = "auto"  # auto: the newest complete checkpoint in checkpoint.dir, if any | never | <path>

    def validate(self) -> None:
        """Range checks (run by `to_config`; __post_init__ would also run on the schema's unresolved defaults)."""
        _need(
            bool(RUN_NAME.fullmatch(self.run_name)) and self.run_name not in (".", ".."),
            "run_name",
            f"{self.run_name!r} is not a plain directory name (letters, digits, '._-'; not '.' or '..')",
        )
        self._check_expert_split()
        _need(
            not (self.trainer.deterministic and self.model.scan_backend == "mamba_ssm"),
            "trainer.deterministic",
            "needs a deterministic scan, but model.scan_backend=mamba_ssm (its backward sums with float "
            "atomics): use model.scan_backend=auto or triton",
        )
        for section in (  # the trainer first: schedule.total_steps is trainer.max_steps unless set
            self.trainer,
            self.optim,
            self.schedule,
            self.parallel,
            self.logging,
            self.checkpoint,
            self.spikes,
        ):
            section.validate()

    def _check_expert_split(self) -> None:
        ep = self.parallel.expert_parallel_size
        if ep == 1:
            return
        model = build_model_config(self.model, self.parallel.activation_checkpointing)
        _need(
            not any(model.layers_is_moe) or model.num_experts % ep == 0,
            "parallel.expert_parallel_size",
            f"{ep} does not divide model.num_experts={model.num_experts} (each rank holds num_experts / "
            f"expert_parallel_size experts of every MoE layer)",
        )


# run_name is a directory under runs/: one plain name, never a path.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def env_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, deepspeed); 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def _rank0(value: Any, other: Any = None) -> Any:
    return value if env_rank() == 0 else other


def register() -> None:
    """Schema and resolvers for Hydra; idempotent. `${rank0:a,b}` is a on rank 0 and b elsewhere, so only
    rank 0 writes Hydra's .hydra/ and log file."""
    if not OmegaConf.has_resolver("rank0"):
        OmegaConf.register_new_resolver("rank0", _rank0)
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Refuse keys the schema lacks, resolve interpolations and run every section's range checks."""
    if extra := unknown_keys(cfg, OmegaConf.structured(Config)):
        raise ConfigError(
            f"{', '.join(extra)}: not a setting of train/config.py (a `+key=` override adds no new "
            f"settings; check the spelling, `python -m train --cfg job` lists them)"
        )
    try:
        out: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except ValueError as e:  # DataConfig's checks, and OmegaConf's validation errors
        raise ConfigError(str(e)) from None
    out.validate()
    return out


def to_container(cfg: Config) -> dict:
    """Plain JSON-able dict (enums as their names) for checkpoints, W&B and JSONL."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore
