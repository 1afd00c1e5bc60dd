"""Token-wise work in recomputed chunks (feed-forwards at long contexts: `ff_chunk_size`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed_chunks(fn: Callable, chunk: int, *rows: torch.Tensor, args: tuple = ()) -> torch.Tensor:
    """fn(*row_chunks, *args) over chunks of `chunk` rows of `rows` (tensors sharing dim 0), concatenated.
    Only each chunk's input is kept for backward, which recomputes the chunk: one chunk's intermediates
    live at a time. Exact for row-independent fn."""
    n = rows[0].shape[0]
    outs = [
        checkpoint(fn, *(r[s : s + chunk] for r in rows), *args, use_reentrant=False)
        for s in range(0, n, chunk)
    ]
    return torch.cat(outs)
