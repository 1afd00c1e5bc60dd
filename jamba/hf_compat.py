"""Weight and config compatibility with transformers' `JambaForCausalLM` (no transformers import needed).

Our module names mirror transformers' state-dict keys, so the conversion is mostly checking:
  - `config_to_hf` / `config_from_hf` (in hf_config.py, re-exported): JambaConfig <-> transformers config.json;
  - `load_hf_state_dict` / `to_hf_state_dict`: strict weight exchange; every missing, unexpected or
    mis-shaped tensor is reported in ONE ValueError naming each tensor and its shapes;
  - `from_pretrained_dir` / `save_pretrained_dir`: a transformers model folder (config.json + safetensors,
    sharded with `model.safetensors.index.json` when large).

Two on-disk layouts of the MoE experts exist. In memory transformers (>= 5) fuses them
(`experts.gate_up_proj` [E, 2F, H], `experts.down_proj` [E, H, F]) like we do, but `save_pretrained`
writes, and the hub's Jamba-v0.1 holds, one tensor per expert (`experts.{e}.{gate,up,down}_proj.weight`).
Loading accepts both; saving writes the per-expert layout by default (what transformers 4.x, 5.x and
other readers such as vLLM load), or the fused one on request.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import JambaConfig
from .hf_config import HF_ARCHITECTURE, config_from_hf, config_to_hf  # noqa: F401 - re-exported
from .model import JambaForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_LEGACY_EXPERT_RE = re.compile(
    r"^(?P<prefix>.+\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)"
    r"\.weight$"
)


def _shape(t) -> tuple | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else f"<{type(t).__name__}, not a tensor>"


def _fmt(shape) -> str:
    return str(list(shape)) if isinstance(shape, tuple) else str(shape)


def fuse_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys (`...experts.{e}.gate_proj.weight` ...) -> transformers' fused tensors.

    Keys that are not per-expert pass through unchanged. Incomplete expert sets raise."""
    out, groups = {}, {}
    for k, v in state_dict.items():
        m = _LEGACY_EXPERT_RE.match(k)
        if m is None:
            out[k] = v
        else:
            groups.setdefault(m["prefix"], {})[(int(m["e"]), m["w"])] = v
    problems = []
    for prefix, ws in groups.items():
        n = 1 + max(e for e, _ in ws)
        lacking = [
            f"{prefix}.{e}.{w}.weight"
            for e in range(n)
            for w in ("gate_proj", "up_proj", "down_proj")
            if (e, w) not in ws
        ]
        if lacking:
            problems.append(f"{prefix}: per-expert tensors missing: {lacking}")
            continue
        try:
            gate = torch.stack([ws[(e, "gate_proj")] for e in range(n)])
            up = torch.stack([ws[(e, "up_proj")] for e in range(n)])
            out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
            out[f"{prefix}.down_proj"] = torch.stack([ws[(e, "down_proj")] for e in range(n)])
        except RuntimeError as err:  # experts of different shapes
            problems.append(f"{prefix}: per-expert tensors do not stack: {err}")
    if problems:
        raise ValueError("state dict: " + "\n".join(problems))
    return out


def split_experts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `fuse_experts`: the per-expert layout transformers' `save_pretrained` writes."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(".feed_forward.experts.gate_up_proj"):
            prefix = k[: -len(".gate_up_proj")]
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :f]
                out[f"{prefix}.{e}.up_proj.weight"] = v[e, f:]
        elif k.endswith(".feed_forward.experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def expected_shapes(cfg: JambaConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor of the transformers state dict of `cfg` (lm_head absent when tied).
    Built on the meta device: nothing is allocated, whatever the model size."""
    with torch.device("meta"):
        model = JambaForCausalLM(cfg, init=False)
    return {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}


def check_state_dict(
    expected: Mapping[str, tuple], state_dict: Mapping, tied: bool
) -> dict[str, torch.Tensor]:
    """Fuse per-expert tensors, drop a tied lm_head equal to the embedding, and verify names and shapes.

    Raises one ValueError listing every missing, unexpected and mis-shaped tensor."""
    sd = fuse_experts(state_dict)
    problems = []
    if tied and "lm_head.weight" in sd and "lm_head.weight" not in expected:
        lm, emb = sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")
        if (
            isinstance(lm, torch.Tensor)
            and isinstance(emb, torch.Tensor)
            and not (lm.shape == emb.shape and (lm.is_meta or emb.is_meta or torch.equal(lm, emb)))
        ):
            problems.append(
                "lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=True"
            )
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad = [k for k in expected if k in sd and _shape(sd[k]) != tuple(expected[k])]
    if missing:
        problems.append(
            f"missing ({len(missing)}): " + ", ".join(f"{k} {_fmt(tuple(expected[k]))}" for k in missing)
        )
    if unexpected:
        problems.append(
            f"unexpected ({len(unexpected)}): " + ", ".join(f"{k} {_fmt(_shape(sd[k]))}" for k in unexpected)
        )
    if bad:
        problems.append(
            f"wrong shape ({len(bad)}): "
            + ", ".join(f"{k} expected {_fmt(tuple(expected[k]))} got {_fmt(_shape(sd[k]))}" for k in bad)
        )
    if problems:
        raise ValueError("state dict does not match the Jamba model:\n  " + "\n  ".join(problems))
    return sd


def _is_tied(model: JambaForCausalLM) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def to_hf_state_dict(model: JambaForCausalLM) -> dict[str, torch.Tensor]:
    """transformers' JambaForCausalLM state dict (fused experts; no lm_head when tied, as saved files).
    Tensors are detached views of the model's parameters, not copies."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if _is_tied(model):
        sd.pop("lm_head.weight", None)
    return sd


@torch.no_grad()
def load_hf_state_dict(model: JambaForCausalLM, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a transformers state dict (fused or per-expert) into `model`, strictly (see check_state_dict).
    Tensors are cast to each parameter's dtype and device."""
    params = model.state_dict(keep_vars=True)
    tied = _is_tied(model)
    expected = {k: tuple(v.shape) for k, v in params.items() if not (tied and k == "lm_head.weight")}
    sd = check_state_dict(expected, state_dict, tied)
    for k, v in sd.items():
        params[k].copy_(v)


# ---- folders --------------------------------------------------------------------------------------
def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: `model.safetensors.index.json` shards, else `model.safetensors`,
    else every `*.safetensors` file in it."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {others}: only safetensors are read here)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{index.name} names {name}, which is not in {path}")
        part = load_file(str(f))
        dup = sorted(set(part) & set(sd))
        if dup:
            raise ValueError(f"tensors {dup[:5]} appear in several weight files of {path}")
        sd.update(part)
    return sd


def from_pretrained_dir(
    path: str | os.PathLike, dtype: torch.dtype | None = None, ignore_unknown_config_keys: bool = False
) -> JambaForCausalLM:
    """Our model from a transformers model folder (config.json + safetensors, sharded or not).
    `dtype`: the model's dtype (default float32, whatever the files hold)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path / CONFIG_NAME} not found: not a transformers model folder")
    cfg = config_from_hf(
        json.loads((path / CONFIG_NAME).read_text()), ignore_unknown=ignore_unknown_config_keys
    )
    sd = read_safetensors_dir(path)
    model = JambaForCausalLM(cfg, init=False)
    if dtype is not None:
        model.to(dtype)
    load_hf_state_dict(model, sd)
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)I?B?\s*", size.upper())
    if m is None:
        raise ValueError(f"bad size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(m[1]) * 1000 ** "_KMGT".index(m[2] or "_"))


def save_hf_checkpoint(
    cfg: JambaConfig,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    expert_layout: str = "per_expert",
    max_shard_size: int | str = "5GB",
    use_mamba_kernels: bool | None = None,
) -> list[str]:
    """Write config.json + safetensors for a (fused, checked) state dict; returns the files written."""
    from safetensors.torch import save_file

    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    hf_cfg = config_to_hf(cfg, use_mamba_kernels=use_mamba_kernels)
    sd = check_state_dict(expected_shapes(cfg), state_dict, cfg.tie_word_embeddings)
    emb = sd["model.embed_tokens.weight"]
    hf_cfg["dtype"] = str(emb.dtype).removeprefix("torch.")
    if expert_layout == "per_expert":
        sd = split_experts(sd)

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model-*-of-*.safetensors"), path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME]:
        if stale.exists():
            stale.unlink()  # a left-over shard or index of an earlier save would be read back
    (path / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards, strict=True):
        # Copies: safetensors refuses views that share storage (tied / split tensors).
        save_file(
            {k: sd[k].detach().to("cpu").contiguous().clone() for k in keys},
            str(path / name),
            metadata={"format": "pt"},
        )
    written = [CONFIG_NAME, *names]
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
        }
        (path / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(WEIGHTS_INDEX_NAME)
    return written


def save_pretrained_dir(
    model: JambaForCausalLM,
    path: str | os.PathLike,
    expert_layout: str = "per_expert",
    max_shard_size: int | str = "5GB",
    use_mamba_kernels: bool | None = None,
) -> list[str]:
    """A folder `transformers.JambaForCausalLM.from_pretrained(path)` loads: config.json + model.safetensors
    (or shards + index above `max_shard_size`). Tensors keep the model's dtypes."""
    return save_hf_checkpoint(
        model.config,
        to_hf_state_dict(model),
        path,
        expert_layout=expert_layout,
        max_shard_size=max_shard_size,
        use_mamba_kernels=use_mamba_kernels,
    )
