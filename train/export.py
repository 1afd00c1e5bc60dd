"""Convert a checkpoint into a transformers model folder:

    python -m train.export <checkpoint> <output_dir> [--dtype bfloat16] [--max-shard-size 5GB] [--corpus DIR]

(`python -m jamba.export` is the same command under its old name.) The output loads with
`transformers.JambaForCausalLM.from_pretrained(output_dir)` and `AutoTokenizer.from_pretrained(output_dir)`.
<checkpoint> is any form `train.weights.load_weights` reads: a run folder, a checkpoint root, a `step_N`
folder, a transformers folder (re-exported: re-sharded / re-typed) or a plain state dict with its config.

Everything is checked before anything is written: the tensors against the config, the layout against what
transformers' Jamba can express (attention and experts placed by period and offset only, no positional
encoding), the corpus's tokenizer, the output folder. A refused export leaves no folder behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

import torch

from jamba import JambaConfig
from jamba.hf_compat import check_state_dict, config_to_hf, expected_shapes, save_hf_checkpoint

from .checkpoint_layout import CheckpointError
from .weights import load_weights, trained_corpus

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_problem(cfg: JambaConfig) -> str | None:
    """Why transformers' Jamba cannot hold this model, or None: what config_to_hf refuses (a layout that is
    not periods and offsets, RoPE, and layer kinds the layer registry marks as not exportable)."""
    try:
        config_to_hf(cfg)
    except ValueError as err:
        return str(err).removeprefix("config_to_hf: ")
    return None


def export(
    checkpoint: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    expert_layout: str = "per_expert",
    corpus: str | Path | None = None,
) -> list[str]:
    """Checkpoint -> transformers folder; returns the files written. `corpus` (default: the one a trainer
    checkpoint names) adds its tokenizer files and config.json takes its bos/eos/pad ids; without a corpus
    only the weights are written (with a warning). Raises CheckpointError / ValueError before writing."""
    w = load_weights(checkpoint)
    cfg = w.config
    problem = export_problem(cfg)
    if problem is not None:
        raise CheckpointError(
            f"transformers' Jamba cannot express this model ({problem}); nothing written. Sample from the "
            f"checkpoint itself with `python -m train.generate {checkpoint} --prompt ...`"
        )
    sd = check_state_dict(expected_shapes(cfg), w.state_dict, cfg.tie_word_embeddings)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    corpus = corpus if corpus is not None else trained_corpus(w.trainer_state)
    tokenizer = None
    if corpus is not None:
        from data.tokenizer_export import tokenizer_files  # the corpus's files, via data/

        if not (Path(corpus) / "manifest.json").is_file():
            raise CheckpointError(
                f"corpus {corpus}: no manifest.json (pass --corpus with the prepared corpus)"
            )
        tokenizer = tokenizer_files(corpus)  # read now: a bad corpus fails before anything is written
        cfg = dataclasses.replace(cfg, **tokenizer[1])
    else:
        print("train.export: warning: no corpus known: no tokenizer written (pass --corpus)", file=sys.stderr)

    out = Path(output_dir)
    created = not out.exists()
    try:
        written = save_hf_checkpoint(cfg, sd, out, expert_layout=expert_layout, max_shard_size=max_shard_size)
        if tokenizer is not None:
            for name, text in tokenizer[0].items():
                (out / name).write_text(text)
                written.append(name)
    except BaseException:
        if created:  # a failed write (disk full, interrupt) leaves no half folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    mode = 0o666 & ~_umask()  # the files as any other file the user writes (safetensors makes 0600)
    for name in written:
        os.chmod(out / name, mode)
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Convert a Jamba checkpoint into a transformers model folder (config.json + safetensors + "
        "the corpus's tokenizer) that transformers.JambaForCausalLM.from_pretrained loads.",
        epilog="Checkpoint forms: a run folder, checkpoint root or step_N folder of a trainer run; a transformers "
        "model folder; a .pt/.pth/.bin/.safetensors state dict (file, or folder holding exactly one) with our "
        "config.json next to it; a DeepSpeed folder with a `latest` file. Layouts transformers cannot express "
        "(a non-periodic layer_pattern, use_rope=true) are refused: sample them with python -m train.generate.",
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


def main(argv: list[str] | None = None, prog: str = "train.export") -> int:
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
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
