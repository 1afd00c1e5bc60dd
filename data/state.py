"""The train loader's resumable state: per-stream token offsets as a closed-form function of one counter.

Stream s is owned by slot u = s mod U, where U = world_size * max(1, num_workers) and slot
u = rank * max(1, num_workers) + worker. A rank's n-th micro-batch comes from its slot n mod workers;
a slot fills a micro-batch by taking windows from its streams round-robin. So with every rank drawing
the same number n of micro-batches (data-parallel lockstep), each stream's offset is
`base + seq_len * picks(n)`, and any rank can state the global position of every stream. In a mixture,
each corpus has its own state and streams, and a slot's picks of a corpus are the rows the mixture's
row schedule (data/mixture.py) gave that corpus.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .mixture import RowSchedule

VERSION = 2  # 2: shuffled plans read the windows of each shard visit permuted
MAX_EPOCHS = 10_000  # a stream further in than this is a damaged state, not a run (seeking it would hang)


@dataclass(frozen=True)
class Layout:
    world_size: int
    num_workers: int
    micro_batch_size: int
    seq_len: int

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.slots_per_rank


@dataclass
class LoaderState:
    fingerprint: str
    seed: int
    shuffle: bool
    num_streams: int
    layout: Layout
    base: list[int] = field(default_factory=list)  # token offset of every stream when this layout began
    batches: int = 0  # micro-batches each rank has drawn since then
    corpus: int = 0  # index of this corpus in its mixture
    weights: tuple[float, ...] = (1.0,)  # the mixture's normalised weights (one corpus: (1.0,))

    @property
    def schedule(self) -> RowSchedule:
        return _schedule(tuple(self.weights), self.seed)

    def slot_streams(self, rank: int, worker: int) -> list[int]:
        u = rank * self.layout.slots_per_rank + worker
        return list(range(u, self.num_streams, self.layout.slots))

    def slot_batches(self, worker: int, n: int) -> int:
        """Micro-batches a rank's slot `worker` produced among the rank's first n."""
        spr = self.layout.slots_per_rank
        return n // spr + (1 if worker < n % spr else 0)

    def slot_offsets(self, rank: int, worker: int, n: int) -> tuple[list[int], int]:
        """Offsets of the slot's streams after the rank's first n micro-batches, and the next pick."""
        streams = self.slot_streams(rank, worker)
        rows = self.layout.micro_batch_size * self.slot_batches(worker, n)
        picks = int(self.schedule.rows(rank * self.layout.slots_per_rank + worker, rows)[self.corpus])
        m = len(streams)
        offs = [
            self.base[s] + self.layout.seq_len * (picks // m + (1 if j < picks % m else 0))
            for j, s in enumerate(streams)
        ]
        return offs, picks % m

    def offsets(self) -> list[int]:
        out = list(self.base)
        for rank in range(self.layout.world_size):
            for w in range(self.layout.slots_per_rank):
                for s, off in zip(
                    self.slot_streams(rank, w), self.slot_offsets(rank, w, self.batches)[0], strict=True
                ):
                    out[s] = off
        return out

    def rebase(self, layout: Layout, weights: tuple[float, ...] | None = None) -> LoaderState:
        """Same stream positions, new (rank, worker) layout or mixture weights: nothing repeated or skipped."""
        return LoaderState(
            self.fingerprint,
            self.seed,
            self.shuffle,
            self.num_streams,
            layout,
            base=self.offsets(),
            batches=0,
            corpus=self.corpus,
            weights=self.weights if weights is None else tuple(weights),
        )

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "version": VERSION,
            "split": "train",
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_streams": self.num_streams,
            "world_size": lay.world_size,
            "num_workers": lay.num_workers,
            "micro_batch_size": lay.micro_batch_size,
            "seq_len": lay.seq_len,
            "base_offsets": list(self.base),
            "batches": self.batches,
            **({"corpus": self.corpus, "weights": list(self.weights)} if len(self.weights) > 1 else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LoaderState:
        try:
            layout = Layout(
                int(d["world_size"]), int(d["num_workers"]), int(d["micro_batch_size"]), int(d["seq_len"])
            )
            st = cls(
                str(d["fingerprint"]),
                int(d["seed"]),
                bool(d["shuffle"]),
                int(d["num_streams"]),
                layout,
                base=[int(x) for x in d["base_offsets"]],
                batches=int(d["batches"]),
                corpus=int(d.get("corpus", 0)),
                weights=tuple(float(w) for w in d.get("weights", (1.0,))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed data loader state ({type(e).__name__}: {e})") from None
        if not 0 <= st.corpus < len(st.weights):
            raise ValueError(f"malformed data loader state: corpus {st.corpus} of {len(st.weights)} weights")
        if len(st.base) != st.num_streams or st.batches < 0 or min(st.base, default=0) < 0:
            raise ValueError(
                f"malformed data loader state: {len(st.base)} offsets for {st.num_streams} streams"
            )
        lay = st.layout
        if (
            min(lay.world_size, lay.micro_batch_size, lay.seq_len) < 1
            or lay.num_workers < 0
            or (lay.slots > st.num_streams)
        ):
            raise ValueError(f"malformed data loader state: layout {lay} for {st.num_streams} streams")
        return st


def check_offsets(offsets: list[int], shards: list, num_streams: int) -> None:
    """DataError for an offset no run reaches: more than MAX_EPOCHS epochs of the largest share of tokens
    one stream can get per epoch (its ceil(shards / streams) largest shards)."""
    from .errors import DataError

    per_epoch = sorted((s.stream_tokens for s in shards), reverse=True)[
        : -(-len(shards) // max(1, num_streams))
    ]
    bound = MAX_EPOCHS * sum(per_epoch)
    for s, off in enumerate(offsets):
        if off > bound:
            raise DataError(
                f"data loader state: stream {s} is at token offset {off}, more than {MAX_EPOCHS} epochs into "
                f"this corpus; the state is damaged or belongs to another corpus"
            )


@functools.lru_cache(maxsize=8)
def _schedule(weights: tuple[float, ...], seed: int) -> RowSchedule:
    return RowSchedule(list(weights), seed)
