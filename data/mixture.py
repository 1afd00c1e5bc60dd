"""Weighted corpus mixtures: which corpus each micro-batch row of a (rank, worker) slot reads, in closed form.

A slot's rows are cut into blocks of BLOCK rows. Every block gives corpus c exactly its largest-remainder
share of BLOCK * weight_c rows, in an order that is a permutation keyed by (seed, slot, block). So the
corpus of row t and the rows each corpus received among a slot's first t rows are pure functions of
(weights, seed, slot, t), computed in O(BLOCK): a loader state that is a position stays one, and every
window of every corpus is still read exactly once per epoch of that corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .order import permutation

BLOCK = 1024
_MIX = 4  # domain tag (see data/order.py)


@dataclass
class MixtureEntry:
    """One corpus of `data.mixture`: a prepared corpus (as `data.path`) and its sampling weight."""

    path: str = "???"
    weight: float = 1.0


def check_weights(entries: list[MixtureEntry]) -> list[float]:
    """The weights normalised to sum 1; a weight <= 0, not finite or not a number is a one-line error."""
    out = []
    for e in entries:
        try:
            w = float(e.weight)
        except (TypeError, ValueError):
            w = float("nan")
        if not math.isfinite(w) or w <= 0:
            raise ValueError(
                f"data.mixture: corpus {e.path}: weight {e.weight!r} must be a finite number > 0"
            )
        out.append(w)
    total = sum(out)
    return [w / total for w in out]


def block_counts(weights: list[float]) -> np.ndarray:
    """Rows per corpus in one block: the largest-remainder rounding of BLOCK * weight (sums to BLOCK)."""
    exact = np.asarray(weights, dtype=np.float64) * BLOCK
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: BLOCK - int(counts.sum())]] += 1
    return counts


class RowSchedule:
    """Corpus of each row of a slot, for weights `weights` (normalised)."""

    def __init__(self, weights: list[float], seed: int) -> None:
        self.weights, self.seed = list(weights), seed
        self.counts = block_counts(self.weights)
        self._assign = np.repeat(np.arange(len(self.weights)), self.counts)
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, slot: int, block: int) -> np.ndarray:
        key = (slot, block)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self._assign[permutation(BLOCK, self.seed, _MIX, slot, block)]
        return self._cache[key]

    def corpus_of(self, slot: int, t: int) -> int:
        if len(self.weights) == 1:
            return 0
        return int(self._block(slot, t // BLOCK)[t % BLOCK])

    def rows(self, slot: int, t: int) -> np.ndarray:
        """Rows each corpus received among the slot's first t rows."""
        if len(self.weights) == 1:
            return np.array([t], dtype=np.int64)
        full, rest = divmod(t, BLOCK)
        out = full * self.counts
        if rest:
            out = out + np.bincount(self._block(slot, full)[:rest], minlength=len(self.weights))
        return out
