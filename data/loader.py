"""TokenLoader: (input_ids, labels) micro-batches from prepared shards, deterministic and exactly resumable.

Train is an infinite stream over epochs, split by rank and DataLoader worker (see data/state.py);
val is one finite, unshuffled pass in which every rank gets the same number of batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .builtin import ensure_builtin_corpus
from .config import DataConfig
from .errors import DataError
from .manifest import ShardInfo, check_local_shards, load_manifest, location
from .order import StreamPlan
from .shards import read_shard
from .state import VERSION, Layout, LoaderState
from .stream import TokenStream
from .synthetic import AnswerTargets, answer_targets

__all__ = ["TokenLoader", "ensure_builtin_corpus"]  # the latter re-exported for the training loop
log = logging.getLogger("data.loader")
Batch = tuple[torch.Tensor, torch.Tensor]


class _ShardSource:
    """Reads shard i of a split (picklable, so DataLoader workers can carry it)."""

    def __init__(self, path: str, shards: list[ShardInfo], dtype: str, verify: bool) -> None:
        self.path, self.shards, self.dtype, self.verify = path, shards, dtype, verify

    def __call__(self, i: int) -> list[np.ndarray]:
        s = self.shards[i]
        return read_shard(location(self.path, s.name), s, self.dtype, self.verify)


def _to_batch(rows: np.ndarray, targets: AnswerTargets | None = None) -> Batch:
    """Labels are the inputs shifted by one; a corpus with a label rule (MQAR: answers only) masks the
    rest with -100."""
    x, y = rows[:, :-1], rows[:, 1:]
    if targets is not None:
        y = targets(x, y)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class _SlotBatches(IterableDataset):
    """The micro-batches of one rank; inside DataLoader worker i it serves slot (i + n0) mod workers,
    so a fresh DataLoader continues the rank's batch sequence exactly where the state says."""

    def __init__(
        self, state: LoaderState, rank: int, source: _ShardSource, eos_id: int, targets: AnswerTargets | None
    ) -> None:
        self.state, self.rank, self.source, self.eos_id = state, rank, source, eos_id
        self.targets = targets

    def __iter__(self) -> Iterator[Batch]:
        st, lay = self.state, self.state.layout
        info = get_worker_info()
        worker = ((info.id if info else 0) + st.batches) % lay.slots_per_rank
        streams = st.slot_streams(self.rank, worker)
        offsets, pick = st.slot_offsets(self.rank, worker, st.batches)
        plan = StreamPlan(self.source.shards, st.num_streams, st.seed, st.shuffle)
        cursors = [
            TokenStream(plan, s, off, self.source, self.eos_id, self.source.dtype)
            for s, off in zip(streams, offsets, strict=True)
        ]
        B, T = lay.micro_batch_size, lay.seq_len
        while True:
            rows = np.empty((B, T + 1), dtype=np.int64)
            for b in range(B):
                rows[b] = cursors[pick].take(T)
                pick = (pick + 1) % len(cursors)
            yield _to_batch(rows, self.targets)


class TokenLoader:
    """Iterable of (input_ids, labels), both LongTensor[micro_batch_size, seq_len]; labels are the
    inputs shifted by one, cut from packed windows of seq_len + 1 tokens (EOS between documents)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, split: str = "train") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.rank, self.world_size, self.split = cfg, rank, world_size, split
        self.manifest = load_manifest(cfg.path)
        self.shards = self.manifest.shards(split)
        if not self.shards:
            raise DataError(
                f"split {split!r} of {cfg.path} has no shards "
                f"(prepare with a larger --val-fraction or more input)"
            )
        check_local_shards(cfg.path, self.shards)
        self.targets = answer_targets(self.manifest.tokenizer, cfg.seq_len)  # None: every token a target
        self._source = _ShardSource(cfg.path, self.shards, self.manifest.dtype, cfg.verify_checksums)
        self.layout = Layout(world_size, cfg.num_workers, cfg.micro_batch_size, cfg.seq_len)
        self._generation = 0
        if split == "train":
            streams = cfg.num_streams or self.layout.slots
            self._check_streams(streams)
            self._state = LoaderState(
                self.manifest.fingerprint, cfg.seed, cfg.shuffle, streams, self.layout, base=[0] * streams
            )
        else:
            self._val_batches = self._count_val_batches()

    # --- metadata -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return int(self.manifest.tokenizer["eos_id"])

    @property
    def bos_id(self) -> int:
        return int(self.manifest.tokenizer["bos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest.tokenizer["pad_id"])

    @property
    def epoch(self) -> int:
        """Epochs every train stream has completed (streams move through epochs independently)."""
        if self.split != "train":
            return 0
        st, plan = self._state, self._plan()
        return min(plan.epoch_at(s, off) for s, off in enumerate(st.offsets()))

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank that make one pass over the train tokens (use it to train N epochs)."""
        tokens = sum(s.stream_tokens for s in self.shards)
        return max(1, tokens // (self.cfg.seq_len * self.cfg.micro_batch_size * self.world_size))

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train stream is infinite; see batches_per_epoch")
        return self._val_batches

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self._iter_val() if self.split == "val" else self._iter_train()

    def _iter_train(self) -> Iterator[Batch]:
        gen, st = self._generation, self._state
        snapshot = LoaderState.from_dict(st.to_dict())
        dataset = _SlotBatches(snapshot, self.rank, self._source, self.eos_id, self.targets)
        if self.cfg.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=self.cfg.prefetch_factor,
                    pin_memory=self.cfg.pin_memory,
                    timeout=self.cfg.timeout_s,
                )
            )
        for batch in batches:
            if gen != self._generation:
                raise RuntimeError("load_state_dict() was called while iterating; start a new iteration")
            st.batches += 1
            yield batch

    def _iter_val(self) -> Iterator[Batch]:
        B, T = self.cfg.micro_batch_size, self.cfg.seq_len
        plan = StreamPlan(self.shards, 1, 0, shuffle=False, max_epochs=1)
        start = self.rank * self._val_batches * B * T
        stream = TokenStream(plan, 0, start, self._source, self.eos_id, self.manifest.dtype)
        for _ in range(self._val_batches):
            rows = np.empty((B, T + 1), dtype=np.int64)
            for b in range(B):
                rows[b] = stream.take(T)
            yield _to_batch(rows, self.targets)

    def _count_val_batches(self) -> int:
        B, T, W = self.cfg.micro_batch_size, self.cfg.seq_len, self.world_size
        sequences = (sum(s.stream_tokens for s in self.shards) - 1) // T
        per_rank = sequences // (W * B)
        if per_rank == 0:
            raise DataError(
                f"val split of {self.cfg.path} holds {sequences} sequences of {T} tokens, fewer than "
                f"one micro-batch per rank ({W} x {B}); use a larger --val-fraction or shorter seq_len"
            )
        if sequences > per_rank * W * B:
            log.info(
                "val: using %d of %d sequences so that all %d ranks get %d batches",
                per_rank * W * B,
                sequences,
                W,
                per_rank,
            )
        return per_rank

    def _plan(self) -> StreamPlan:
        return StreamPlan(self.shards, self._state.num_streams, self._state.seed, self._state.shuffle)

    def _check_streams(self, streams: int) -> None:
        n, slots = len(self.shards), self.layout.slots
        if streams > n:
            raise ValueError(
                f"{streams} streams (num_streams, or world_size x num_workers = "
                f"{self.world_size} x {max(1, self.cfg.num_workers)}) exceed the {n} train shards of "
                f"{self.cfg.path}; prepare with a smaller --shard-size-mb or use fewer workers"
            )
        if slots > streams:
            raise ValueError(
                f"world_size x num_workers = {self.world_size} x {max(1, self.cfg.num_workers)} = "
                f"{slots} slots, but the data is split into {streams} streams (num_streams, fixed "
                f"by the checkpointed state); use at most {streams} slots, e.g. fewer workers"
            )
        if streams % slots:
            log.warning(
                "%d streams over %d (rank, worker) slots: some slots read more streams than others, "
                "so their shards advance more slowly",
                streams,
                slots,
            )

    # --- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable. With all ranks drawing the same number of batches it is the same on every
        rank and describes every rank's position, so saving rank 0's copy is enough."""
        if self.split == "val":
            return {"version": VERSION, "split": "val", "fingerprint": self.manifest.fingerprint}
        d = self._state.to_dict()
        d["epoch"] = self.epoch  # informational
        return d

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. A different world size, worker count, micro-batch
        size or seq_len continues every stream at its exact token offset (nothing repeated or skipped)."""
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise ValueError(f"not a data loader state of version {VERSION}: {str(state)[:200]}")
        if state.get("split") != self.split:
            raise ValueError(f"state is for split {state.get('split')!r}, this loader reads {self.split!r}")
        if state.get("fingerprint") != self.manifest.fingerprint:
            raise ValueError(
                f"data loader state was saved for a corpus with manifest fingerprint "
                f"{state.get('fingerprint')!r}, but {self.cfg.path} has "
                f"{self.manifest.fingerprint!r}: the data changed since the checkpoint"
            )
        if self.split == "val":
            return
        st = LoaderState.from_dict(state)
        if st.seed != self.cfg.seed or st.shuffle != self.cfg.shuffle:
            raise ValueError(
                f"state was saved with seed={st.seed}, shuffle={st.shuffle}; the config has "
                f"seed={self.cfg.seed}, shuffle={self.cfg.shuffle}"
            )
        if self.cfg.num_streams and self.cfg.num_streams != st.num_streams:
            raise ValueError(
                f"state has num_streams={st.num_streams}, the config asks for {self.cfg.num_streams}; "
                f"set num_streams to 0 (take it from the state) or {st.num_streams}"
            )
        self._check_streams(st.num_streams)
        if st.layout != self.layout:
            log.info(
                "data: resuming with a new layout %s (was %s); every stream continues at its exact "
                "token offset",
                self.layout,
                st.layout,
            )
            st = st.rebase(self.layout)
        self._state = st
        self._generation += 1
