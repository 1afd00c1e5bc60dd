"""Convert a training checkpoint into a transformers model folder.

    python -m jamba.export <checkpoint> <output_dir> [--dtype bfloat16] [--max-shard-size 5GB]

The output loads with `transformers.JambaForCausalLM.from_pretrained(output_dir)` (and with our
`jamba.hf_compat.from_pretrained_dir`). Accepted inputs, all resolved by `_load_checkpoint`:
  1. a transformers model folder (config.json with "model_type": "jamba" + *.safetensors), e.g. one written
     by `save_pretrained_dir` (re-exported: re-sharded / re-typed);
  2. a plain model state dict, `.pt`/`.pth`/`.bin` (torch.save) or `.safetensors`, given as the file or as
     the folder holding it, with our `config.json` (`JambaConfig.to_dict()`) next to it;
  3. a DeepSpeed checkpoint folder (it has a `latest` file naming the tag), from which the consolidated
     `<dir>/<tag>/model_state.safetensors` + `<dir>/<tag>/model_config.json` the trainer writes are read.

New checkpoint formats (e.g. reading ZeRO-sharded optimizer/model states directly) are added in
`_load_checkpoint` only: everything after it works on (JambaConfig, name -> tensor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from train.checkpoint_layout import LATEST, MODEL_CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, CheckpointError

from .config import JambaConfig
from .hf_compat import (
    CONFIG_NAME,
    check_state_dict,
    config_from_hf,
    expected_shapes,
    read_safetensors_dir,
    save_hf_checkpoint,
)

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- reading ----------------------------------------------------------------------------------------
def _read_config(path: Path) -> tuple[JambaConfig, bool]:
    """Our JambaConfig from either our own config dict or a transformers one; (config, is_hf)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the model config {path}: {err}") from err
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    if "model_type" in d or "architectures" in d:
        return config_from_hf(d), True
    return JambaConfig.from_dict(d), False


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
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True): {err}") from err
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


def _load_deepspeed(folder: Path) -> tuple[JambaConfig, dict[str, torch.Tensor]]:
    tag = (folder / LATEST).read_text().strip()
    if not re.fullmatch(r"(global_)?step_?\d+", tag):  # a child of the folder, never a path elsewhere
        raise CheckpointError(
            f"{folder / LATEST} names {tag[:100]!r}, not a step_N (or DeepSpeed global_stepN) folder in {folder}"
        )
    tag_dir = folder / tag
    state, config = tag_dir / WEIGHTS_FILE, tag_dir / MODEL_CONFIG_FILE
    lacking = [str(p) for p in (state, config) if not p.is_file()]
    if lacking:
        raise CheckpointError(
            f"{folder} is a DeepSpeed checkpoint (latest -> {tag!r}) but {lacking} not found. The trainer writes "
            f"a consolidated {WEIGHTS_FILE} + {MODEL_CONFIG_FILE} into each tag folder; ZeRO-sharded states "
            "alone are not read yet"
        )
    cfg, _ = _read_config(config)
    return cfg, _read_state_file(state)


def _load_checkpoint(path: str | Path) -> tuple[JambaConfig, dict[str, torch.Tensor]]:
    """The one place that knows checkpoint formats: path -> (config, transformers-named state dict).

    Extend here for new formats (DeepSpeed ZeRO shards without a consolidated state, ...)."""
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
        cfg, _ = _read_config(config)
        return cfg, _read_state_file(path)
    if (path / LATEST).is_file():
        return _load_deepspeed(path)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(
            f"{path}: not a checkpoint folder: no {CONFIG_NAME} (model folder / plain state dict) "
            "and no `latest` file (DeepSpeed checkpoint)"
        )
    cfg, is_hf = _read_config(config)
    if is_hf or any(path.glob("*.safetensors")):
        try:
            return cfg, read_safetensors_dir(path)
        except FileNotFoundError:
            if is_hf:
                raise
    return cfg, _read_state_file(_state_file_in(path))


def trained_corpus(checkpoint: str | Path) -> str | None:
    """The corpus a trainer checkpoint (DeepSpeed folder) was trained on, from its trainer_state.json:
    data.path, or a mixture's first corpus (relative paths: to the CWD, as in training). None if unknown."""
    path = Path(checkpoint)
    if not (path / LATEST).is_file():
        return None
    try:
        state = json.loads((path / (path / LATEST).read_text().strip() / STATE_FILE).read_text())
        data = state["config"]["data"]
        return str(data["mixture"][0]["path"] if data.get("mixture") else data["path"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


# ---- converting -------------------------------------------------------------------------------------
def export(
    checkpoint: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    expert_layout: str = "per_expert",
    corpus: str | Path | None = None,
) -> list[str]:
    """Checkpoint -> transformers folder; returns the files written. Validates every tensor's name and
    shape against the config before writing anything (no model is built: any size converts).

    `corpus` (default: the one a trainer checkpoint names) adds its tokenizer files, and config.json
    takes its bos/eos/pad ids; without a corpus found, only the weights are written (with a warning)."""
    cfg, sd = _load_checkpoint(checkpoint)
    sd = check_state_dict(expected_shapes(cfg), sd, cfg.tie_word_embeddings)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    corpus = corpus if corpus is not None else trained_corpus(checkpoint)
    if corpus is not None and not (Path(corpus) / "manifest.json").is_file():
        raise CheckpointError(f"corpus {corpus}: no manifest.json (pass --corpus with the prepared corpus)")
    if corpus is None:
        print("jamba.export: warning: no corpus known: no tokenizer written (pass --corpus)", file=sys.stderr)
        return save_hf_checkpoint(
            cfg, sd, output_dir, expert_layout=expert_layout, max_shard_size=max_shard_size
        )
    from data.tokenizer_export import TOKENIZER_FILES, write_tokenizer  # the corpus's files, via data/

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(corpus, output_dir)
    cfg = dataclasses.replace(cfg, **ids)
    written = save_hf_checkpoint(
        cfg, sd, output_dir, expert_layout=expert_layout, max_shard_size=max_shard_size
    )
    return [*written, *TOKENIZER_FILES]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jamba.export",
        description="Convert a Jamba training checkpoint into a transformers model folder "
        "(config.json + safetensors) that transformers.JambaForCausalLM.from_pretrained loads.",
        epilog="Checkpoint forms: a transformers/save_pretrained_dir folder; a .pt/.pth/.bin/.safetensors "
        "state dict (file, or folder holding exactly one) with our config.json next to it; a DeepSpeed "
        "checkpoint folder with a `latest` file and <tag>/model_state.safetensors + "
        "<tag>/model_config.json.",
    )
    p.add_argument("checkpoint", help="checkpoint file or folder")
    p.add_argument("output_dir", help="folder to write (created; must be empty unless --force)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="keep",
        help="cast floating-point tensors (default: keep each tensor's dtype)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the weights into shards of at most this size, with an index (default 5GB)",
    )
    p.add_argument(
        "--expert-layout",
        choices=("per_expert", "fused"),
        default="per_expert",
        help="per_expert (default): experts.{e}.{gate,up,down}_proj.weight as transformers' "
        "save_pretrained writes; fused: experts.gate_up_proj / experts.down_proj tensors",
    )
    p.add_argument(
        "--corpus",
        help="prepared corpus whose tokenizer to include (default: the data.path a trainer checkpoint names)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"output {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise CheckpointError(f"output folder {out} is not empty (use --force to write into it)")
        if Path(args.checkpoint).resolve() == out.resolve():
            raise CheckpointError("output_dir must differ from the checkpoint")
        written = export(
            args.checkpoint,
            out,
            dtype=DTYPES[args.dtype],
            max_shard_size=args.max_shard_size,
            expert_layout=args.expert_layout,
            corpus=args.corpus,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"jamba.export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
