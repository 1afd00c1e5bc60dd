"""Recall on an MQAR corpus: `python -m launch.recall CHECKPOINT [--data PATH] [--device cuda]`.

Scores every example of the corpus's val split (data/synthetic.py) at its answer positions only: the
model reads the whole example once (causal, so a query sees the context and earlier queries, never its
own answer) and an answer counts as recalled when the argmax over the whole vocabulary is the right value
(as Zoology scores). Accuracy is reported per number of key-value pairs K; chance is 1/|values|.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.manifest import load_manifest, location
from data.shards import read_shard
from data.synthetic import answer_targets
from train.progress import progress


def val_examples(corpus: str) -> tuple[np.ndarray, dict]:
    """(examples [N, seq_len - 1], the manifest's tokenizer entry) of an MQAR corpus's val split."""
    man = load_manifest(corpus)
    if answer_targets(man.tokenizer) is None:
        raise DataError(
            f"{corpus} is not an MQAR corpus (prepare one with python -m data.prepare --synthetic mqar)"
        )
    docs = [d for s in man.shards("val") for d in read_shard(location(corpus, s.name), s, man.dtype)]
    return np.stack(docs).astype(np.int64), man.tokenizer


@torch.no_grad()
def score(model, examples: np.ndarray, tokenizer: dict, device="cpu", batch_size: int = 250) -> dict:
    """{"K=4": {"acc", "answers", "examples"}, ..., "chance"}: accuracy over the answer positions."""
    rule = answer_targets(tokenizer)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.eval()
    hits: dict[int, int] = {}
    answers: dict[int, int] = {}
    rows: dict[int, int] = {}
    total = -(-len(examples) // batch_size)
    with progress("recall", total=total, logger=logging.getLogger("launch.recall")) as tick:
        for i in range(0, len(examples), batch_size):
            x = examples[i : i + batch_size]
            mask = rule.mask(x[:, :-1], x[:, 1:])
            with autocast:
                logits = model(torch.from_numpy(x[:, :-1]).to(device), return_logits=True).logits
            right = (logits.argmax(-1).cpu().numpy() == x[:, 1:]) & mask
            for k, n_hit, n_ans in zip(rule.pairs(x), right.sum(-1), mask.sum(-1), strict=True):
                k = int(k)
                hits[k], answers[k], rows[k] = (
                    hits.get(k, 0) + n_hit,
                    answers.get(k, 0) + n_ans,
                    rows.get(k, 0) + 1,
                )
            tick()
    out: dict = {
        f"K={k}": {
            "acc": int(hits[k]) / max(int(answers[k]), 1),
            "answers": int(answers[k]),
            "examples": rows[k],
        }
        for k in sorted(hits)
    }
    lo, hi = tokenizer["values"]
    out["chance"] = 1.0 / (hi - lo)
    return out


def recall_checkpoint(ckpt: str | Path, corpus: str | None = None, device: str = "cpu") -> dict:
    """Score one checkpoint (a step_* directory or a checkpoint root) on its run's corpus (or `corpus`)."""
    from train.checkpoint import read_state, resolve
    from train.eval import load_model, run_data_path

    ckpt = resolve(ckpt)
    state = read_state(ckpt)
    corpus = run_data_path(state, corpus)  # a checkpoint's path only if local: never a pipe: from a file
    examples, tokenizer = val_examples(corpus)
    model = load_model(ckpt, torch.device(device))
    result = score(model, examples, tokenizer, device)
    return {"checkpoint": str(ckpt), "step": state["step"], "data": corpus, "eval": "mqar", **result}


def is_mqar_run(ckpt: Path, data: str | None = None) -> bool:
    """Whether the run of this checkpoint trained on an MQAR corpus (its manifest asks for answer loss)."""
    from train.checkpoint import CheckpointError, read_state
    from train.eval import run_data_path

    try:
        corpus = run_data_path(read_state(ckpt), data)
        return answer_targets(load_manifest(corpus).tokenizer) is not None
    except (OSError, KeyError, DataError, CheckpointError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", help="step_* directories or checkpoint roots")
    p.add_argument("--data", help="MQAR corpus (default: the run's data.path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # progress lines
    try:
        for c in a.checkpoints:
            print(json.dumps(recall_checkpoint(c, a.data, a.device)))
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
