"""Model weights from any checkpoint form: `load_weights(path)` -> (JambaConfig, transformers-named tensors).

The one reader that `train.export`, `train.generate` and `init_from` share. Accepted paths:
  1. a trainer run: its run folder (`checkpoints/` inside), a checkpoint root, or one `step_N` folder
     (train.checkpoint picks the newest complete checkpoint; model_state.safetensors + model_config.json);
  2. a transformers model folder (config.json with "model_type": "jamba" + safetensors): an export, or a
     published JambaForCausalLM;
  3. a plain state dict (.pt/.pth/.bin/.safetensors) with our config.json (JambaConfig.to_dict()) beside it,
     given as the file or as the folder holding it;
  4. a DeepSpeed folder whose `latest` names a global_stepN / step_N folder holding the consolidated files.
Nothing in a checkpoint is run: state dicts are read with torch.load(weights_only=True) or safetensors.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from jamba import JambaConfig, JambaForCausalLM
from jamba.hf_compat import CONFIG_NAME, config_from_hf, load_hf_state_dict, read_safetensors_dir

from .checkpoint_layout import MODEL_CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_state, resolve

log = logging.getLogger("train.weights")
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
RUN_CHECKPOINTS = "checkpoints"  # <run_dir>/checkpoints: checkpoint.dir's default


@dataclass
class Weights:
    config: JambaConfig
    state_dict: dict[str, torch.Tensor]
    source: Path  # the step_N folder, model folder or file read
    kind: str  # "trainer" | "transformers" | "state_dict"
    trainer_state: dict | None = None  # a trainer checkpoint's trainer_state.json


def _read_config(path: Path) -> tuple[JambaConfig, bool]:
    """Our JambaConfig from our own config dict or a transformers one; (config, is_transformers)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the model config {path}: {err}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    try:
        if "model_type" in d or "architectures" in d:
            return config_from_hf(d), True
        return JambaConfig.from_dict({**d, "activation_checkpointing": "none"}), False
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _unwrap(obj, source: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd object -> name -> tensor: accepts {"model": sd} / {"state_dict": sd} / {"module": sd}
    wrappers and strips DDP's "module." and torch.compile's "_orig_mod." prefixes."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} does not hold a model state dict (name -> tensor)")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: entries {not_tensors[:5]} are not tensors; expected a plain state dict"
        )
    return sd


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling failure the same way
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True): {err}") from None
    return _unwrap(obj, path)


def _state_file_in(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in STATE_SUFFIXES)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[p.name for p in found]})"
        raise CheckpointError(
            f"{folder}: expected exactly one state-dict file ({'/'.join(STATE_SUFFIXES)}) "
            f"next to {CONFIG_NAME}, found {what}"
        )
    return found[0]


def _consolidated(folder: Path, what: str) -> tuple[JambaConfig, dict[str, torch.Tensor]]:
    """The whole model a trainer checkpoint folder holds (model_state.safetensors + model_config.json)."""
    state, config = folder / WEIGHTS_FILE, folder / MODEL_CONFIG_FILE
    lacking = [p.name for p in (state, config) if not p.is_file()]
    if lacking:
        raise CheckpointError(
            f"{what} but {folder} lacks {lacking}. The trainer writes a consolidated {WEIGHTS_FILE} + "
            f"{MODEL_CONFIG_FILE} into each checkpoint; ZeRO-sharded states alone are not read"
        )
    cfg, _ = _read_config(config)
    return cfg, _read_state_file(state)


def _load_deepspeed(folder: Path) -> Weights:
    """A DeepSpeed-style folder whose `latest` names its tag (global_stepN too, not only our step_N)."""
    tag = (folder / "latest").read_text().strip()
    if not re.fullmatch(r"(global_)?step_?\d+", tag):  # a child of the folder, never a path elsewhere
        raise CheckpointError(
            f"{folder / 'latest'} names {tag[:100]!r}, not a step_N (or DeepSpeed global_stepN) folder in {folder}"
        )
    cfg, sd = _consolidated(folder / tag, f"{folder} is a DeepSpeed checkpoint (latest -> {tag!r})")
    return Weights(cfg, sd, folder / tag, "trainer")


def _load_folder(path: Path) -> Weights:
    """A transformers model folder, or a plain state dict with our config.json."""
    cfg, is_hf = _read_config(path / CONFIG_NAME)
    if is_hf or any(path.glob("*.safetensors")):
        try:
            return Weights(cfg, read_safetensors_dir(path), path, "transformers" if is_hf else "state_dict")
        except FileNotFoundError as err:
            if is_hf:
                raise CheckpointError(str(err)) from None
    return Weights(cfg, _read_state_file(_state_file_in(path)), path, "state_dict")


def _is_trainer_checkpoint(path: Path) -> bool:
    return (
        (path / RUN_CHECKPOINTS).is_dir()
        or (path / "latest").is_file()
        or (path / WEIGHTS_FILE).is_file()
        or any(re.fullmatch(r"step_\d+", p.name) for p in path.iterdir())
    )


def load_weights(path: str | Path) -> Weights:
    """Config and tensors (transformers' names, as saved: per-expert or fused experts) of any checkpoint form
    above; CheckpointError names what was expected."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix not in STATE_SUFFIXES:
            raise CheckpointError(f"{path}: unknown checkpoint file type; expected one of {STATE_SUFFIXES}")
        config = path.parent / CONFIG_NAME
        if not config.is_file():
            raise CheckpointError(
                f"{path}: no {CONFIG_NAME} next to it (our JambaConfig.to_dict() or a transformers config)"
            )
        return Weights(_read_config(config)[0], _read_state_file(path), path, "state_dict")
    if (path / CONFIG_NAME).is_file():
        return _load_folder(path)
    if not _is_trainer_checkpoint(path):
        raise CheckpointError(
            f"{path}: not a checkpoint: no {CONFIG_NAME} (transformers model folder / plain state dict), no "
            f"{RUN_CHECKPOINTS}/ (run folder), no step_N folders or `latest` file (checkpoint root)"
        )
    root = path / RUN_CHECKPOINTS if (path / RUN_CHECKPOINTS).is_dir() else path
    try:
        ckpt = resolve(root)
    except CheckpointError:
        if (root / "latest").is_file():  # not ours: a DeepSpeed folder (global_stepN, no trainer state)
            return _load_deepspeed(root)
        raise
    cfg, sd = _consolidated(ckpt, f"{ckpt} is a trainer checkpoint")
    return Weights(cfg, sd, ckpt, "trainer", read_state(ckpt))


def trained_corpus(state: dict | None) -> str | None:
    """The corpus a trainer checkpoint's run read (data.path, or its mixture's first corpus), or None."""
    try:
        data = state["config"]["data"]
        return str(data["mixture"][0]["path"] if data.get("mixture") else data["path"])
    except (KeyError, IndexError, TypeError):
        return None


# Config fields that change neither the weights' shapes nor the forward (initialisation knobs, notes).
_NOT_ARCHITECTURE = {
    "extra",
    "residual_in_fp32",
    "initializer_range",
    "mamba_dt_min",
    "mamba_dt_max",
    "mamba_dt_init_floor",
    "max_position_embeddings",
}
# The layout is compared as a pattern string: periods and a layer_pattern may describe the same layers.
_LAYOUT = {
    "layer_pattern",
    "attn_layer_period",
    "attn_layer_offset",
    "expert_layer_period",
    "expert_layer_offset",
}


def config_differences(there: JambaConfig, here: JambaConfig) -> list[str]:
    """'field X there, Y here' for every architecture field that differs ('layout' for the layer pattern)."""
    a, b = there.to_dict(), here.to_dict()
    skip = _NOT_ARCHITECTURE | _LAYOUT
    out = [f"{k} {a[k]!r} there, {b[k]!r} here" for k in a if k in b and k not in skip and a[k] != b[k]]
    if there.pattern != here.pattern:
        out.insert(0, f"layout {there.pattern!r} there, {here.pattern!r} here")
    return out


def init_from(model, path: str | Path) -> Weights:
    """Copy the weights of any checkpoint form into `model` (weights only: the caller starts a fresh step,
    schedule, data position and optimizer). A model of another shape is a ValueError of one line naming
    the config fields that differ; fields that differ without changing shapes (RoPE, special token ids,
    router coefficients) are returned by config_differences for the caller to log."""
    from jamba.hf_compat import load_hf_state_dict

    w = load_weights(path)
    try:
        load_hf_state_dict(model, w.state_dict)
    except ValueError as err:
        diffs = config_differences(w.config, model.config)
        what = "; ".join(diffs) or str(err).replace("\n", " ")[:300]
        raise ValueError(
            f"init_from={path} holds a model of another shape: {what}; set model.* to match"
        ) from None
    return w


def start_from(path: str, model, model_cfg: JambaConfig, resume: str, resume_from: Path | None) -> None:
    """The trainer's `init_from`: the weights only, on every rank before the model is spread. A checkpoint
    of the run itself takes precedence (a restarted job goes on from its own step); init_from together with
    resume=<path> is an error. Raises ConfigError (one line, exit 2) on another model shape."""
    from .config import ConfigError

    if resume_from is not None and resume != "auto":
        raise ConfigError(
            f"init_from and resume={resume} both choose the starting weights: keep one (init_from: weights "
            f"only, fresh step; resume: weights, optimizer, step and data position)"
        )
    if resume_from is not None:
        log.info("init_from=%s not used: resuming this run's own checkpoint %s", path, resume_from)
        return
    try:
        w = init_from(model, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for diff in config_differences(w.config, model_cfg):
        log.warning("init_from: %s (the shapes fit; the weights were trained with the other)", diff)
    log.info("initialised from %s (%s weights): step 0, fresh optimizer, schedule and data", w.source, w.kind)


def build_model(w: Weights, device: torch.device) -> JambaForCausalLM:
    """The model `w` holds on `device`, eval mode, its kernels chosen for that device (the evaluation and
    sampling run bf16 autocast on a GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = JambaForCausalLM(w.config, init=False, device_type=device.type, dtype=dtype)
    load_hf_state_dict(model, w.state_dict)
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device) -> JambaForCausalLM:
    """Any checkpoint form `load_weights` reads, as a model on `device`."""
    return build_model(load_weights(path), device)
