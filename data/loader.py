"""TokenLoader: (input_ids, labels) micro-batches from prepared shards, deterministic and exactly resumable.

Train is an infinite stream over epochs, split by rank and DataLoader worker (see data/state.py);
val is one finite, unshuffled pass in which every rank gets the same number of batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .builtin import ensure_builtin_corpus
from .config import DataConfig
from .errors import DataError
from .manifest import ShardInfo, check_local_shards, load_manifest, location
from .mixture import MixtureEntry, check_weights
from .order import StreamPlan
from .shards import read_shard
from .state import VERSION, Layout, LoaderState, check_offsets
from .stream import TokenStream
from .synthetic import AnswerTargets, answer_targets

__all__ = ["TokenLoader", "ensure_builtin_corpus"]  # the latter re-exported for the training loop
log = logging.getLogger("data.loader")
AUTO_STREAMS = 8  # num_streams=0: this many streams (within the shards), more if there are more slots
Batch = tuple[torch.Tensor, torch.Tensor]


class _ShardSource:
    """Reads shard i of a split (picklable, so DataLoader workers can carry it). Every token id is checked
    against the vocabulary whatever `verify` says: an id past it would index past the embedding."""

    def __init__(self, path: str, shards: list[ShardInfo], dtype: str, verify: bool, vocab_size: int) -> None:
        self.path, self.shards, self.dtype, self.verify = path, shards, dtype, verify
        self.vocab_size = vocab_size

    def __call__(self, i: int) -> list[np.ndarray]:
        s = self.shards[i]
        url = location(self.path, s.name)
        docs = read_shard(url, s, self.dtype, self.verify)
        top = max((int(d.max()) for d in docs if d.size), default=-1)
        if top >= self.vocab_size:
            raise DataError(
                f"shard {url}: token id {top} is outside the vocabulary of {self.vocab_size} ids in the "
                f"manifest (corrupt; re-run prepare)"
            )
        return docs


def _to_batch(rows: np.ndarray, targets: AnswerTargets | None = None) -> Batch:
    """Labels are the inputs shifted by one; a corpus with a label rule (MQAR: answers only) masks the
    rest with -100."""
    x, y = rows[:, :-1], rows[:, 1:]
    if targets is not None:
        y = targets(x, y)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class _SlotBatches(IterableDataset):
    """The micro-batches of one rank; inside DataLoader worker i it serves slot (i + n0) mod workers,
    so a fresh DataLoader continues the rank's batch sequence exactly where the state says. Each row
    reads the corpus the mixture's row schedule names (one corpus: always it)."""

    def __init__(
        self,
        states: list[LoaderState],
        rank: int,
        sources: list[_ShardSource],
        eos_id: int,
        targets: AnswerTargets | None,
    ) -> None:
        self.states, self.rank, self.sources, self.eos_id = states, rank, sources, eos_id
        self.targets = targets

    def __iter__(self) -> Iterator[Batch]:
        lay, n = self.states[0].layout, self.states[0].batches
        info = get_worker_info()
        worker = ((info.id if info else 0) + n) % lay.slots_per_rank
        cursors, picks = [], []
        for st, source in zip(self.states, self.sources, strict=True):
            offsets, pick = st.slot_offsets(self.rank, worker, n)
            plan = StreamPlan(source.shards, st.num_streams, st.seed, st.shuffle)
            cursors.append(
                [
                    TokenStream(plan, s, off, source, self.eos_id, source.dtype)
                    for s, off in zip(st.slot_streams(self.rank, worker), offsets, strict=True)
                ]
            )
            picks.append(pick)
        B, T = lay.micro_batch_size, lay.seq_len
        schedule, slot = self.states[0].schedule, self.rank * lay.slots_per_rank + worker
        t = B * self.states[0].slot_batches(worker, n)  # the slot's rows so far
        while True:
            rows = np.empty((B, T + 1), dtype=np.int64)
            for b in range(B):
                c = schedule.corpus_of(slot, t)
                rows[b] = cursors[c][picks[c]].take(T)
                picks[c] = (picks[c] + 1) % len(cursors[c])
                t += 1
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
        entries = list(cfg.mixture) if split == "train" and cfg.mixture else [MixtureEntry(cfg.path, 1.0)]
        if split == "val" and cfg.mixture:
            entries = [MixtureEntry(cfg.mixture[0].path, 1.0)]  # a mixture validates on its first corpus
        weights = check_weights(entries)
        self.paths = [str(e.path) for e in entries]
        self.manifests = [self._manifest(p, named=bool(cfg.mixture)) for p in self.paths]
        self.manifest, self.path = self.manifests[0], self.paths[0]
        _check_same_tokenizer(self.paths, self.manifests)
        if cfg.expect_fingerprint and self.manifest.fingerprint != cfg.expect_fingerprint:
            raise DataError(
                f"{self.path} holds a corpus with manifest fingerprint {self.manifest.fingerprint!r}, not the "
                f"one data.expect_fingerprint pins: the corpus was replaced or is another one"
            )
        self.targets = answer_targets(self.manifest.tokenizer, cfg.seq_len)  # None: every token a target
        self.layout = Layout(world_size, cfg.num_workers, cfg.micro_batch_size, cfg.seq_len)
        self._generation = 0
        self._sources = []
        for path, man in zip(self.paths, self.manifests, strict=True):
            shards = man.shards(split)
            if not shards:
                raise DataError(
                    f"split {split!r} of {path} has no shards (prepare with a larger --val-fraction or more input)"
                )
            check_local_shards(path, shards)
            self._sources.append(_ShardSource(path, shards, man.dtype, cfg.verify_checksums, man.vocab_size))
        self.shards, self._source = self._sources[0].shards, self._sources[0]
        if split == "train":
            self._states = []
            for i, source in enumerate(self._sources):
                n = len(source.shards)
                streams = cfg.num_streams or min(n, max(self.layout.slots, AUTO_STREAMS))
                self._check_streams(streams, i)
                self._states.append(
                    LoaderState(
                        self.manifests[i].fingerprint,
                        cfg.seed,
                        cfg.shuffle,
                        streams,
                        self.layout,
                        base=[0] * streams,
                        corpus=i,
                        weights=tuple(weights),
                    )
                )
        else:
            self._val_batches = self._count_val_batches()

    @staticmethod
    def _manifest(path: str, named: bool):
        """The corpus's manifest; in a mixture, a load error names the corpus first."""
        try:
            return load_manifest(path)
        except DataError as e:
            raise DataError(f"corpus {path}: {e}" if named else str(e)) from None

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
        return min(
            StreamPlan(src.shards, st.num_streams, st.seed, st.shuffle).epoch_at(s, off)
            for st, src in zip(self._states, self._sources, strict=True)
            for s, off in enumerate(st.offsets())
        )

    def tokens_per_corpus(self) -> dict[str, int]:
        """Train tokens every rank together has read from each corpus (its directory name as the key)."""
        names = [os.path.basename(os.path.normpath(p)) or p for p in self.paths]
        names = [f"{n}.{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        return {n: sum(st.offsets()) for n, st in zip(names, self._states, strict=True)}

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank that make one pass over the train tokens (use it to train N epochs)."""
        tokens = sum(s.stream_tokens for src in self._sources for s in src.shards)
        return max(1, tokens // (self.cfg.seq_len * self.cfg.micro_batch_size * self.world_size))

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train stream is infinite; see batches_per_epoch")
        return self._val_batches

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self._iter_val() if self.split == "val" else self._iter_train()

    def _iter_train(self) -> Iterator[Batch]:
        gen, states = self._generation, self._states
        snapshot = [LoaderState.from_dict(st.to_dict()) for st in states]
        dataset = _SlotBatches(snapshot, self.rank, self._sources, self.eos_id, self.targets)
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
            for st in states:
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
                f"val split of {self.path} holds {sequences} sequences of {T} tokens, fewer than "
                f"one micro-batch per rank ({W} x {B}); use a larger --val-fraction or shorter seq_len"
            )
        if sequences > per_rank * W * B:
            log.info(
                "val: %d batch%s%s (%d of %d sequences; the rest fill no whole batch)",
                per_rank,
                "" if per_rank == 1 else "es",
                f" on each of {W} ranks" if W > 1 else "",
                per_rank * W * B,
                sequences,
            )
        return per_rank

    def _check_streams(self, streams: int, corpus: int = 0) -> None:
        shards, path = self._sources[corpus].shards, self.paths[corpus]
        n, slots = len(shards), self.layout.slots
        ranks = f"world_size x num_workers = {self.world_size} x {max(1, self.cfg.num_workers)}"
        if slots > n:
            mb = sum(s.bytes for s in shards) / (1 << 20) / slots
            raise ValueError(
                f"{ranks} = {slots} (rank, worker) slots, but {path} has only {n} train "
                f"shard(s) and each slot reads whole shards; prepare it again with --shard-size-mb "
                f"{mb:.3g} or less (its train split is {mb * slots:.3g} MB), or use fewer ranks/workers"
            )
        if streams > n:
            raise ValueError(
                f"data.num_streams={streams} exceeds the {n} train shards of {path}; "
                f"use at most {n} (or 0: chosen from the shards)"
            )
        if slots > streams:
            raise ValueError(
                f"{ranks} = {slots} slots, but {path} is split into {streams} streams (num_streams, "
                f"fixed by the checkpointed state); use at most {streams} slots, e.g. fewer workers"
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
        rank and describes every rank's position, so saving rank 0's copy is enough. A mixture's state
        holds one such state per corpus under "mixture"."""
        if self.split == "val":
            return {"version": VERSION, "split": "val", "fingerprint": self.manifest.fingerprint}
        if len(self._states) == 1:
            d = self._states[0].to_dict()
        else:
            parts = [{**st.to_dict(), "path": p} for st, p in zip(self._states, self.paths, strict=True)]
            d = {"version": VERSION, "split": "train", "mixture": parts}
        d["epoch"] = self.epoch  # informational
        return d

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. A different world size, worker count, micro-batch
        size, seq_len or mixture weights continues every stream at its exact token offset (nothing
        repeated or skipped)."""
        if not isinstance(state, dict) or state.get("version") != VERSION:
            raise ValueError(
                f"not a data loader state of version {VERSION} (version 1 predates shuffled windows): "
                f"{str(state)[:200]}"
            )
        if state.get("split") != self.split:
            raise ValueError(f"state is for split {state.get('split')!r}, this loader reads {self.split!r}")
        if self.split == "val":
            parts = [state]
        else:
            parts = state.get("mixture", [state])
            if not isinstance(parts, list) or len(parts) != len(self._states):
                raise ValueError(
                    f"data loader state holds {len(parts) if isinstance(parts, list) else '?'} corpora, "
                    f"the config reads {len(self._states)} ({', '.join(self.paths)})"
                )
        for part, man, path in zip(parts, self.manifests, self.paths, strict=False):
            if not isinstance(part, dict) or part.get("fingerprint") != man.fingerprint:
                got = part.get("fingerprint") if isinstance(part, dict) else None
                raise ValueError(
                    f"data loader state was saved for a corpus with manifest fingerprint {got!r}, but "
                    f"{path} has {man.fingerprint!r}: the data changed since the checkpoint"
                )
        if self.split == "val":
            return
        states = [LoaderState.from_dict(p) for p in parts]
        for i, st in enumerate(states):
            check_offsets(st.offsets(), self._sources[i].shards, st.num_streams)
            if st.seed != self.cfg.seed or st.shuffle != self.cfg.shuffle:
                raise ValueError(
                    f"state was saved with seed={st.seed}, shuffle={st.shuffle}; the config has "
                    f"seed={self.cfg.seed}, shuffle={self.cfg.shuffle}"
                )
            if self.cfg.num_streams and self.cfg.num_streams != st.num_streams:
                raise ValueError(
                    f"state has num_streams={st.num_streams} for {self.paths[i]}, the config asks for "
                    f"{self.cfg.num_streams}; set num_streams to 0 (take it from the state) or {st.num_streams}"
                )
            self._check_streams(st.num_streams, i)
        weights = self._states[0].weights
        if states[0].layout != self.layout or states[0].weights != weights:
            log.info(
                "data: resuming with layout %s and mixture weights %s (was %s, %s); every stream "
                "continues at its exact token offset",
                self.layout,
                list(weights),
                states[0].layout,
                list(states[0].weights),
            )
            states = [st.rebase(self.layout, weights) for st in states]
        self._states = states
        self._generation += 1


def _check_same_tokenizer(paths: list[str], manifests: list) -> None:
    """A mixture's corpora must share one tokenizer (same ids, same specials, same file)."""

    def key(man) -> tuple:
        t = man.tokenizer
        return tuple(t.get(k) for k in ("kind", "vocab_size", "bos_id", "eos_id", "pad_id", "sha256"))

    for path, man in zip(paths[1:], manifests[1:], strict=True):
        if key(man) != key(manifests[0]):
            raise ValueError(
                f"data.mixture: corpus {path} was tokenized with {man.tokenizer.get('spec')!r} "
                f"(vocab {man.vocab_size}), corpus {paths[0]} with {manifests[0].tokenizer.get('spec')!r} "
                f"(vocab {manifests[0].vocab_size}); a mixture needs one tokenizer"
            )
