"""A stream's packed token sequence (documents, each followed by EOS), readable from any token offset.

Windows of seq_len + 1 tokens advance by seq_len, so consecutive windows share one token and every
token after the first is a next-token target exactly once: no padding, nothing dropped between windows.
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


class TokenStream:
    """Token offset -> windows, loading one shard visit at a time (resume = seek, not replay)."""

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

    def _append_visit(self) -> bool:
        v = self.plan.visit(self.stream, self._next_visit)
        if v is None:
            return False
        epoch, shard = v
        tokens = pack_documents(self._load(shard), self.plan.doc_order(epoch, shard), self._eos, self._dtype)
        buf = np.concatenate([self._buf, tokens]) if self._buf.size else tokens
        cut = min(self.offset - self._buf_start, buf.size)  # drop what lies before the read position
        self._buf, self._buf_start = buf[cut:], self._buf_start + cut
        self._next_visit += 1
        return True

    def take(self, n: int) -> np.ndarray | None:
        """Tokens [offset, offset + n + 1) and advance by n; None when a finite plan runs out."""
        end = self.offset + n + 1
        while self._buf_start + self._buf.size < end:
            if not self._append_visit():
                return None
        i = self.offset - self._buf_start
        window = self._buf[i : i + n + 1]
        self.offset += n
        return window
