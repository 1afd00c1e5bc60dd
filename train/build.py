"""Building a run's parts from its config: data loaders, model, parallelism, DeepSpeed engine, metric sinks.

Order (the trainer follows it): data -> model from jamba/ -> spread by parallel/ -> optimizer -> engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from data import DataConfig, DataError, TokenLoader, ensure_builtin_corpus
from jamba import JambaConfig, JambaForCausalLM
from jamba.hf_compat import to_hf_state_dict
from parallel.config import effective_zero_stage, matmul_dtype
from parallel.zero import deepspeed_config, skip_single_rank_allreduce

from .config import Config, ConfigError, WandbMode, build_model_config
from .distributed import Dist, barrier
from .metrics import ConsoleSink, DeferredSink, JsonlSink, Metrics, WandbSink
from .optim import SkippableAdamW, build_optimizer

log = logging.getLogger("train.build")
VOCAB_MULTIPLE = 64  # GEMM-friendly embedding and LM-head shapes


def build_data(dcfg: DataConfig, dist: Dist) -> tuple[TokenLoader, TokenLoader | None]:
    """This rank's train stream and validation split (None, with a warning, when the corpus has none)."""
    paths = [e.path for e in dcfg.mixture] or [dcfg.path]
    if os.path.normpath(DataConfig().path) in map(os.path.normpath, paths):  # the built-in corpus
        if dist.is_main:
            ensure_builtin_corpus(dcfg.path)  # prepared once, on first use
        barrier()
    try:
        train = TokenLoader(dcfg, rank=dist.rank, world_size=dist.world_size, split="train")
    except ValueError as e:  # the loader's layout checks (streams vs shards, ranks vs streams)
        raise ConfigError(f"data: {e}") from None
    try:
        val = TokenLoader(dcfg, rank=dist.rank, world_size=dist.world_size, split="val")
    except DataError as e:
        log.warning("no validation: %s", e)
        val = None
    return train, val


def padded_vocab_size(data_vocab_size: int) -> int:
    """The corpus's vocabulary rounded up to a multiple of VOCAB_MULTIPLE (the extra ids are never targets:
    the loader checks every token id against the corpus's vocabulary)."""
    return -(-data_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(
    cfg: Config,
    data_vocab_size: int,
    token_ids: dict[str, int] | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> tuple[JambaConfig, JambaForCausalLM]:
    """model.vocab_size unset: the corpus's vocabulary, padded; set: as given, and it must hold the data.
    model.bos/eos/pad_token_id unset: the corpus's (`token_ids`), so checkpoints and exports carry them.
    The kernels (`runtime`) are chosen here, once, for `device` and the resolved `precision`."""
    model = cfg.model
    unset = {k: v for k, v in (token_ids or {}).items() if getattr(model, k) is None}
    if unset:
        model = dataclasses.replace(model, **unset)
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=padded_vocab_size(data_vocab_size))
        log.info(
            "model.vocab_size=%d: the %d ids of %s, padded to a multiple of %d",
            model.vocab_size,
            data_vocab_size,
            cfg.data.path,
            VOCAB_MULTIPLE,
        )
    model_cfg = build_model_config(model)
    if model_cfg.vocab_size < data_vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the {data_vocab_size} token ids of "
            f"{cfg.data.path}; set model.vocab_size={padded_vocab_size(data_vocab_size)} or leave it unset"
        )
    dev = (device or torch.device("cpu")).type
    try:
        m = JambaForCausalLM(
            model_cfg,
            seed=cfg.trainer.seed,
            runtime=cfg.runtime,
            device_type=dev,
            dtype=matmul_dtype(precision),
        )
    except ValueError as e:  # an explicit backend that cannot run here
        raise ConfigError(str(e)) from None
    return model_cfg, m


def set_deterministic(on: bool) -> bool:
    """trainer.deterministic: torch's deterministic algorithms (an op without one raises), cuBLAS's fixed
    workspaces, no cuDNN autotuning. Must run before the model is built (it picks the scan and conv kernels).
    Returns the previous setting, for Trainer.close to restore."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its handle
        torch.use_deterministic_algorithms(True)
        # which also fills every torch.empty with NaN (3 ms of a 426M step on an H200): our kernels write all
        # they allocate, so that buys nothing here
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    return before


def log_kernels(model: JambaForCausalLM) -> None:
    """The kernels this run takes, chosen once when the model was built (jamba/runtime.py)."""
    log.info(
        "kernels: %s, deterministic algorithms %s",
        model.backends.describe(),
        "on" if torch.are_deterministic_algorithms_enabled() else "off",
    )


def build_engine(model: nn.Module, cfg: Config, dist: Dist, precision: str):
    """(DeepSpeed engine, our optimizer). The engine owns ZeRO partitioning and gradient accumulation; the
    optimizer is the object whose param groups carry the LR and whose update is skipped or clipped by the
    arguments of one call (train/optim.py optimizer_step)."""
    import deepspeed

    model.to(dist.device)
    optimizer: SkippableAdamW = build_optimizer(model, cfg.optim, dist.device)
    stage = effective_zero_stage(cfg.parallel.zero_stage, dist.world_size)
    ds_config = deepspeed_config(
        zero_stage=stage,
        micro_batch_size=cfg.data.micro_batch_size,
        grad_accum_steps=cfg.trainer.grad_accum_steps,
        grad_clip=0.0,  # our optimizer clips, at every stage (train/optim.py optimizer_step)
        precision=precision,
        on_gpu=dist.device.type == "cuda",
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    skip_single_rank_allreduce(engine, dist.world_size)
    return engine, optimizer


def consolidated_state_dict(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The whole model's weights in transformers' names (for jamba.export and train.eval), gathered over
    expert parallelism. Collective."""
    if dist.ep.size == 1:
        return to_hf_state_dict(model)
    from parallel.expert_parallel import gather_full_state_dict

    sd = gather_full_state_dict(model, dist)
    if model.lm_head.weight is model.model.embed_tokens.weight:
        sd.pop("lm_head.weight", None)
    return sd


def build_metrics(cfg: Config, dist: Dist, config: dict, model_cfg: JambaConfig, wandb_id: str) -> Metrics:
    """Console, JSONL and W&B sinks on rank 0; none elsewhere."""
    if not dist.is_main:
        return Metrics([])
    lc, run_dir = cfg.logging, Path(cfg.run_dir).absolute()
    sinks: list = [ConsoleSink(cfg.trainer.max_steps, dist.world_size)]
    if lc.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if lc.wandb.mode != WandbMode.disabled:
        wb_config = {**config, "model_resolved": model_cfg.to_dict(), "world_size": dist.world_size}
        sinks.append(DeferredSink(lambda: WandbSink(lc.wandb, run_dir, cfg.run_name, wandb_id, wb_config)))
    return Metrics(sinks)
