"""Data order as a pure function of (seed, epoch, position).

Train shards are dealt to `num_streams` independent streams: concatenate the per-epoch shard
permutations into one infinite sequence Q = perm(epoch 0) ++ perm(epoch 1) ++ ...; stream s reads
Q[s], Q[s + S], Q[s + 2S], ... ("visits"), each visit's documents in a per-(epoch, shard) permutation.
A stream is cut into windows on a grid of seq_len tokens; with shuffling on, the windows that start in one
visit are read in a per-(epoch, shard) permutation too, so consecutive reads of a stream are unrelated
parts of its shard (see data/stream.py). Nothing here depends on world size or workers, so a stream's
window sequence is fixed by the seed, and a position inside it is just a token offset (windows read x seq_len). Hashing is our own (splitmix64), so the order does not
change with numpy's RNG implementation.
"""

from __future__ import annotations

import numpy as np

from .manifest import ShardInfo

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SHARDS, _DOCS, _WINDOWS = 1, 2, 3  # domain tags, so shard, document and window permutations are independent


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) determined by the integers in `key` alone."""
    h = _GOLDEN
    for part in key:
        h = _mix_int(h ^ _mix_int(part))
    with np.errstate(over="ignore"):
        vals = _mix_array(np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(h))
    return np.argsort(vals, kind="stable")


class StreamPlan:
    """Which shard each visit of each stream reads, and in which document order."""

    def __init__(
        self,
        shards: list[ShardInfo],
        num_streams: int,
        seed: int,
        shuffle: bool = True,
        max_epochs: int | None = None,
    ) -> None:
        if not shards:
            raise ValueError("a stream plan needs at least one shard")
        self.shards, self.num_streams, self.seed = shards, num_streams, seed
        self.shuffle, self.max_epochs = shuffle, max_epochs
        self._perms: dict[int, np.ndarray] = {}

    def _shard_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            n = len(self.shards)
            self._perms[epoch] = permutation(n, self.seed, _SHARDS, epoch) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def visit(self, stream: int, k: int) -> tuple[int, int] | None:
        """(epoch, shard index) of stream's k-th visit, or None past the last epoch of a finite plan."""
        epoch, pos = divmod(stream + k * self.num_streams, len(self.shards))
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return None
        return epoch, int(self._shard_perm(epoch)[pos])

    def doc_order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.shards[shard].documents
        return permutation(n, self.seed, _DOCS, epoch, shard) if self.shuffle else np.arange(n)

    def window_order(self, epoch: int, shard: int, count: int) -> np.ndarray:
        """Order in which the `count` windows starting in one visit of `shard` are read."""
        return permutation(count, self.seed, _WINDOWS, epoch, shard) if self.shuffle else np.arange(count)

    def locate(self, stream: int, offset: int) -> tuple[int, int]:
        """(k, token offset where visit k starts) for the visit holding `offset`; arithmetic on the
        manifest's token counts, no shard is read. Past the end of a finite plan: (k_end, end offset)."""
        k = start = 0
        while (v := self.visit(stream, k)) is not None:
            length = self.shards[v[1]].stream_tokens
            if offset < start + length:
                break
            start += length
            k += 1
        return k, start

    def epoch_at(self, stream: int, offset: int) -> int:
        k, _ = self.locate(stream, offset)
        return (stream + k * self.num_streams) // len(self.shards)
