"""Shared helpers for the data tests: a small synthetic corpus and batch collection (no tests here)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

from data import DataConfig, TokenLoader
from data.prepare import prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def write_corpus(root: Path, n_docs: int = 48, seed: int = 0, length: tuple[int, int] = (5, 80)) -> Path:
    """Text files of varied length (`length`: words per document); every document starts with a unique tag so it
    can be recognised."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*length)))
        (root / f"doc{i:03d}.txt").write_text(f"<{i}> {words}\n")
    return root


def make_prepared(
    tmp: Path, n_docs: int = 48, shard_kb: float = 2.0, val_fraction: float = 0.125, **kw
) -> str:
    src = write_corpus(tmp / "src", n_docs)
    out = tmp / "prepared"
    prepare(
        [str(src)],
        str(out),
        workers=1,
        progress=False,
        shard_size_mb=shard_kb / 1024,
        val_fraction=val_fraction,
        **kw,
    )
    return str(out)


def cfg(path: str, **kw) -> DataConfig:
    kw.setdefault("seq_len", 16)
    kw.setdefault("micro_batch_size", 2)
    return DataConfig(path=path, **kw)


def take(loader: TokenLoader, n: int) -> list[tuple]:
    """First n batches of a fresh iteration, as nested lists (easy to compare)."""
    it = iter(loader)
    try:
        return [(x.tolist(), y.tolist()) for x, y in itertools.islice(it, n)]
    finally:
        it.close()  # shuts DataLoader workers down now, not at garbage collection


def windows(batches: list[tuple]) -> Counter:
    """Multiset of the seq_len + 1 token windows behind a list of batches."""
    out: Counter = Counter()
    for x, y in batches:
        for xi, yi in zip(x, y, strict=True):
            out[tuple(xi) + (yi[-1],)] += 1
    return out
