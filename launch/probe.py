"""In-context associative recall: can a checkpoint look a value up in its own context?

A prompt lists K key-value pairs, then repeats one key; the model should continue with that key's value:

    <eos>q=7;c=2;x=7;m=0;c=      ->  2

Keys are K distinct letters, values random digits, one byte each, so with the byte tokenizer every key,
value and separator is exactly one token and nothing is learned from tokenization. The answer is only in
the context (values are drawn independently of keys), so the score measures in-context retrieval: the
paper's ablation (arXiv 2403.19887, sec. 6) finds pure Mamba weak at exactly this kind of in-context
lookup, and the hybrid on par with attention.

Score: `acc` = fraction of prompts where the argmax over the value alphabet is the right value (chance
1/|values| = 0.10); `acc_free` = argmax over the whole vocabulary (chance at most 0.10); `logp` = mean
log-probability of the right value, renormalised over the value alphabet (chance log(1/10) = -2.30).
Prompts are seeded and identical for every checkpoint, so scores compare across variants.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.progress import progress

KEYS = "abcdefghijklmnopqrstuvwxyz"
VALUES = "0123456789"


@dataclass(frozen=True)
class ProbeConfig:
    num_pairs: tuple[int, ...] = (4, 8, 16)  # K; a prompt has 4K + 3 tokens
    num_prompts: int = 200  # per K
    seed: int = 0
    pair_sep: str = ";"  # between pairs: "k=v;k=v;k="
    kv_sep: str = "="


def chance(values: str = VALUES) -> float:
    return 1.0 / len(values)


def make_prompts(k: int, n: int, seed: int, cfg: ProbeConfig = ProbeConfig()) -> tuple[list[str], list[str]]:
    """n prompts of k pairs and their answers. Seeded by (seed, k), so the same for every checkpoint."""
    if not 1 <= k <= len(KEYS):
        raise ValueError(f"num_pairs must be in [1, {len(KEYS)}] (distinct one-letter keys), got {k}")
    rng = np.random.default_rng([seed, k])
    prompts, answers = [], []
    for _ in range(n):
        keys = rng.choice(list(KEYS), size=k, replace=False)
        vals = rng.choice(list(VALUES), size=k, replace=True)
        q = int(rng.integers(k))
        body = cfg.pair_sep.join(f"{a}{cfg.kv_sep}{b}" for a, b in zip(keys, vals, strict=True))
        prompts.append(f"{body}{cfg.pair_sep}{keys[q]}{cfg.kv_sep}")
        answers.append(str(vals[q]))
    return prompts, answers


def _single_ids(tokenizer, chars: str) -> list[int]:
    """One token id per character; the probe is built for tokenizers where that holds (byte-level)."""
    ids = []
    for c in chars:
        enc = tokenizer.encode_batch([c])[0]
        if len(enc) != 1:
            raise ValueError(
                f"the tokenizer encodes {c!r} as {len(enc)} tokens; the recall probe needs "
                f"one token per key, value and separator (use the byte tokenizer)"
            )
        ids.append(int(enc[0]))
    return ids


@torch.no_grad()
def score(
    model,
    tokenizer,
    cfg: ProbeConfig = ProbeConfig(),
    device: str | torch.device = "cpu",
    batch_size: int = 100,
) -> dict:
    """{"K=4": {"acc", "acc_free", "logp", "n"}, ..., "chance": 0.1}. Tokens are concatenated per character
    (never re-tokenized), each prompt starting with EOS like a packed document."""
    model.eval()
    value_ids = torch.tensor(_single_ids(tokenizer, VALUES), device=device)
    charset = KEYS + VALUES + cfg.pair_sep + cfg.kv_sep
    to_id = dict(zip(charset, _single_ids(tokenizer, charset), strict=True))
    out: dict = {}
    batches = len(cfg.num_pairs) * -(-cfg.num_prompts // batch_size)
    with progress("recall probe", total=batches, logger=logging.getLogger("launch.probe")) as tick:
        for k in cfg.num_pairs:
            prompts, answers = make_prompts(k, cfg.num_prompts, cfg.seed, cfg)
            ids = torch.tensor([[tokenizer.eos_id] + [to_id[c] for c in p] for p in prompts], device=device)
            target = torch.tensor([VALUES.index(a) for a in answers], device=device)
            hits = free_hits = 0
            logp = 0.0
            for i in range(0, len(prompts), batch_size):
                logits = model(ids[i : i + batch_size], return_logits=True).logits[:, -1].float()
                t = target[i : i + batch_size]
                restricted = torch.log_softmax(logits[:, value_ids], dim=-1)
                hits += int((restricted.argmax(-1) == t).sum())
                free_hits += int((logits.argmax(-1) == value_ids[t]).sum())
                logp += float(restricted.gather(1, t[:, None]).sum())
                tick()
            n = len(prompts)
            out[f"K={k}"] = {"acc": hits / n, "acc_free": free_hits / n, "logp": logp / n, "n": n}
    out["chance"] = chance()
    out["chance_logp"] = math.log(chance())
    return out


def probe_checkpoint(
    ckpt: str | Path, cfg: ProbeConfig = ProbeConfig(), device: str = "cpu", data: str | None = None
) -> dict:
    """Score one checkpoint (a step_* directory or a checkpoint root) with the tokenizer of its corpus:
    `data`, else the checkpoint's data.path when that is a local directory (never a URL or pipe: command
    from a checkpoint)."""
    from data.errors import DataError
    from data.tokenizer import ByteTokenizer, tokenizer_for_corpus
    from train.checkpoint import CheckpointError, read_state, resolve
    from train.eval import load_model, run_data_path

    ckpt = resolve(ckpt)
    state = read_state(ckpt)
    try:
        tokenizer = tokenizer_for_corpus(run_data_path(state, data))
    except (OSError, KeyError, ValueError, DataError, CheckpointError) as e:
        logging.getLogger("launch.probe").warning("%s; probing with the byte tokenizer", e)
        tokenizer = ByteTokenizer()  # the corpus moved (or is remote): the built-in one is byte-level
    model = load_model(ckpt, torch.device(device))
    return {"checkpoint": str(ckpt), "step": state["step"], **score(model, tokenizer, cfg, device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", help="step_* directories or checkpoint roots")
    p.add_argument("--pairs", default="4,8,16", help="comma-separated numbers of key-value pairs K")
    p.add_argument("--prompts", type=int, default=200, help="prompts per K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="corpus whose tokenizer to use (default: the run's, if a local directory)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # progress lines
    cfg = ProbeConfig(num_pairs=tuple(int(x) for x in a.pairs.split(",")), num_prompts=a.prompts, seed=a.seed)
    for c in a.checkpoints:
        print(json.dumps(probe_checkpoint(c, cfg, a.device, a.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
