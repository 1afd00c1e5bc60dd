"""A stream's packed token sequence (documents, each followed by EOS), read as windows from any offset.

Windows of seq_len + 1 tokens start on a grid of seq_len tokens, so neighbouring windows share one token and
every token after the first is a next-token target exactly once: no padding, nothing dropped between windows.
Unshuffled, the windows are read in grid order. Shuffled, the windows that start inside one shard visit
(a "group") are read in the plan's permutation for that visit: the n-th read of a group is the window at grid
point `first + order[n] * seq_len`. The n-th read of the whole stream is still at "offset" n * seq_len (plus
the grid's origin), so a stream position stays one token offset, and every window of a visit is read once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .order import StreamPlan


def pack_documents(docs: list[np.ndarray], order: np.ndarray, eos_id: int, dtype: str) -> np.ndarray:
    eos = np.array([eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    for i in order:
        parts.append(docs[int(i)])
        parts.append(eos)
    return np.concatenate(parts)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class TokenStream:
    """Token offset -> windows, loading one shard visit at a time (resume = seek, not replay).

    The grid step is the `n` of the first `take(n)` and its origin is the starting offset modulo `n`.
    """

    def __init__(
        self,
        plan: StreamPlan,
        stream: int,
        offset: int,
        load: Callable[[int], list[np.ndarray]],
        eos_id: int,
        dtype: str,
    ) -> None:
        self.plan, self.stream, self.offset = plan, stream, int(offset)
        self._load, self._eos, self._dtype = load, eos_id, dtype
        self._next_visit, self._buf_start = plan.locate(stream, self.offset)
        self._buf = np.empty(0, dtype=dtype)
        self._keep_from = self.offset  # tokens before this are dropped as visits are appended
        self._step: int | None = None
        self._group: tuple[int, int, int, int, np.ndarray] | None = None  # visit, start, end, first, order

    def _append_visit(self) -> bool:
        v = self.plan.visit(self.stream, self._next_visit)
        if v is None:
            return False
        epoch, shard = v
        tokens = pack_documents(self._load(shard), self.plan.doc_order(epoch, shard), self._eos, self._dtype)
        buf = np.concatenate([self._buf, tokens]) if self._buf.size else tokens
        cut = min(max(self._keep_from - self._buf_start, 0), buf.size)
        self._buf, self._buf_start = buf[cut:], self._buf_start + cut
        self._next_visit += 1
        return True

    def _window_start(self, n: int) -> int | None:
        """Grid point of the window read at the current offset (shuffled plans), None past a finite plan."""
        g = self.offset
        if self._group is None or g >= self._group[2]:
            k, start = (
                (self._group[0] + 1, self._group[2]) if self._group else self.plan.locate(self.stream, g)
            )
            while True:  # the visit holding g (visits too short for a grid point are passed over)
                v = self.plan.visit(self.stream, k)
                if v is None:
                    return None
                end = start + self.plan.shards[v[1]].stream_tokens
                if g < end:
                    break
                k, start = k + 1, end
            origin = g % n
            first = origin + _ceil_div(start - origin, n) * n
            count = _ceil_div(end - origin, n) - _ceil_div(start - origin, n)
            self._group = (k, start, end, first, self.plan.window_order(v[0], v[1], count))
            self._keep_from = start
            loaded_end = self._buf_start + self._buf.size  # always the end of visit _next_visit - 1
            if loaded_end <= start:
                self._buf, self._buf_start, self._next_visit = self._buf[:0], start, k
            else:
                cut = start - self._buf_start
                self._buf, self._buf_start = self._buf[max(cut, 0) :], max(self._buf_start, start)
        _, _, _, first, order = self._group
        return first + int(order[(g - first) // n]) * n

    def take(self, n: int) -> np.ndarray | None:
        """The next window of n + 1 tokens, advancing the offset by n; None when a finite plan runs out."""
        if self._step is None:
            self._step = n
        elif n != self._step:
            raise ValueError(f"this stream reads windows of {self._step} tokens, not {n}")
        if self.plan.shuffle:
            w = self._window_start(n)
            if w is None:
                return None
        else:
            w = self._keep_from = self.offset
        end = w + n + 1
        while self._buf_start + self._buf.size < end:
            if not self._append_visit():
                return None
        i = w - self._buf_start
        self.offset += n
        return self._buf[i : i + n + 1]
