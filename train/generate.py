"""Sample from a checkpoint: `python -m train.generate CHECKPOINT --prompt TEXT [options]`.

CHECKPOINT is a run folder, a checkpoint root, a `step_N` folder or an exported (transformers) folder: any
model the trainer trains (any layer pattern, RoPE, MoE), whether or not transformers could hold it. The text
is encoded with the run's tokenizer (a trainer checkpoint: its corpus's; an exported folder: the
tokenizer.json in it; or --tokenizer), after the end-of-document token the corpus separates documents with,
so the prompt starts a document as in training. Generation stops at the next end of document or after
--max-new-tokens. The prompt and its continuation go to stdout, the speed to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data import DataError
from data.tokenizer import HFTokenizer, load_tokenizer, tokenizer_for_corpus
from jamba.generation import Sampling, generate

from .checkpoint_layout import CheckpointError
from .eval import run_data_path
from .weights import Weights, build_model, load_weights


def find_tokenizer(w: Weights, given: str | None):
    """--tokenizer (byte, a tokenizer.json, a folder holding one, or a prepared corpus), else the run's
    corpus (a local path only: nothing a checkpoint names is run or fetched), else the folder's own."""
    if given:
        p = Path(given)
        if (p / "manifest.json").is_file():
            return tokenizer_for_corpus(given)
        if p.is_dir():
            p = p / "tokenizer.json"
        return load_tokenizer("byte" if given == "byte" else str(p))
    if w.trainer_state is not None:
        corpus = run_data_path(w.trainer_state, None)
        if not (Path(corpus) / "manifest.json").is_file():
            raise CheckpointError(
                f"the run's corpus {corpus} is not here (no manifest.json): give --tokenizer"
            )
        return tokenizer_for_corpus(corpus)
    folder = w.source if w.source.is_dir() else w.source.parent
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_file(folder / "tokenizer.json")
    raise CheckpointError(
        f"{w.source} carries no tokenizer: give --tokenizer (byte, a tokenizer.json or a corpus)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run folder, checkpoint root, step_N folder or exported folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many tokens (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens of total probability p (1: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="byte, a tokenizer.json, a folder holding one, or a prepared corpus")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence for every token (slow)"
    )
    return p


def _check(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        raise ValueError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _check(a)
        device = torch.device(a.device)
        w = load_weights(a.checkpoint)
        tok = find_tokenizer(w, a.tokenizer)
        model = build_model(w, device)
        if tok.vocab_size > model.config.vocab_size:
            raise DataError(f"the tokenizer has {tok.vocab_size} ids, the model {model.config.vocab_size}")
        # uint16 ids from the tokenizer: torch has no max() for them; the model takes int64
        ids = np.concatenate([[tok.eos_id], tok.encode_batch([a.prompt])[0]]).astype(np.int64)
        prompt = torch.from_numpy(ids)[None].to(device)
        gen = generate(
            model,
            prompt,
            a.max_new_tokens,
            Sampling(a.temperature, a.top_k, a.top_p),
            torch.Generator(device).manual_seed(a.seed),
            stop_id=tok.eos_id,
            vocab_limit=tok.vocab_size,
            use_cache=not a.no_cache,
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        )
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        print(f"train.generate: error: {e}", file=sys.stderr)
        return 2
    new = gen.tokens[0, len(ids) :].tolist()
    if new and new[-1] == tok.eos_id:
        new = new[:-1]
    print(a.prompt + tok.decode(new))
    decode_rate = (
        (gen.new_tokens - 1) / gen.decode_s if gen.new_tokens > 1 and gen.decode_s > 0 else float("nan")
    )
    print(
        f"train.generate: {gen.new_tokens} new tokens from {w.source} on {device.type}: prompt of {len(ids)} "
        f"tokens {gen.prefill_s * 1e3:.0f} ms, then {decode_rate:.1f} tokens/s"
        f"{' (no cache)' if a.no_cache else ''}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
