"""Exact resumability: batches 0..N-1 == batches 0..k-1, save, new loader, restore, k..N-1."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from test_data_common import cfg, make_prepared, take, windows

from data import TokenLoader
from data.manifest import load_manifest, location
from data.order import StreamPlan
from data.shards import read_shard
from data.state import LoaderState
from data.stream import TokenStream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_prepared(tmp_path_factory.mktemp("corpus"))


def run_and_resume(config, n: int, k: int, rank: int = 0, world_size: int = 1) -> tuple[list, list]:
    first = TokenLoader(config, rank, world_size)
    it = iter(first)
    head = [(x.tolist(), y.tolist()) for x, y in itertools.islice(it, k)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    it.close()
    second = TokenLoader(config, rank, world_size)
    second.load_state_dict(state)
    return head + take(second, n - k), take(TokenLoader(config, rank, world_size), n)


@pytest.mark.parametrize("k", [0, 1, 7, 13])
def test_resume_in_process_is_exact(corpus, k):
    resumed, reference = run_and_resume(cfg(corpus, num_streams=3), 20, k)
    assert resumed == reference


@pytest.mark.parametrize("k", [3, 4])
def test_resume_with_workers_is_exact(corpus, k):
    """k=3 resumes mid-rotation over the 2 workers, k=4 at a rotation boundary."""
    resumed, reference = run_and_resume(cfg(corpus, num_workers=2, num_streams=4), 9, k, rank=1, world_size=2)
    assert resumed == reference


def test_resume_across_epoch_boundary(corpus):
    loader = TokenLoader(cfg(corpus, seq_len=64, micro_batch_size=4))
    n = 2 * loader.batches_per_epoch + 3
    resumed, reference = run_and_resume(cfg(corpus, seq_len=64, micro_batch_size=4), n, n - 5)
    assert resumed == reference


def test_state_is_the_same_on_every_rank(corpus):
    states = []
    for rank in range(3):
        loader = TokenLoader(cfg(corpus, num_streams=6), rank, 3)
        take_and_keep(loader, 5)
        states.append(loader.state_dict())
    assert states[0] == states[1] == states[2] and states[0]["batches"] == 5


def take_and_keep(loader: TokenLoader, n: int) -> list:
    """Like take(), but through the loader's own iterator so that its state advances."""
    it = iter(loader)
    out = [(x.tolist(), y.tolist()) for x, y in itertools.islice(it, n)]
    it.close()
    return out


def reference_windows(path: str, state: dict) -> Counter:
    """Every stream read from offset 0 up to the state's offsets, straight from the shards."""
    man = load_manifest(path)
    st = LoaderState.from_dict(state)
    shards = man.shards("train")
    plan = StreamPlan(shards, st.num_streams, st.seed, st.shuffle)

    def load(i):
        return read_shard(location(path, shards[i].name), shards[i], man.dtype)

    out: Counter = Counter()
    T = st.layout.seq_len
    for s, end in enumerate(st.offsets()):
        stream = TokenStream(plan, s, 0, load, 257, man.dtype)
        while stream.offset < end:
            out[tuple(stream.take(T).tolist())] += 1
    return out


@pytest.mark.parametrize("before,after", [((2, 0), (3, 0)), ((3, 2), (1, 0)), ((1, 0), (2, 2))])
def test_world_size_change_neither_repeats_nor_skips(corpus, before, after):
    """2 ranks -> 3 ranks (and worker-count changes): the union of everything consumed is exactly each
    stream's prefix up to its final offset."""
    consumed: Counter = Counter()
    state = None
    for (world, workers), steps in ((before, 7), (after, 5)):
        config = cfg(corpus, num_streams=6, num_workers=workers)
        for rank in range(world):
            loader = TokenLoader(config, rank, world)
            if state is not None:
                loader.load_state_dict(state)
            consumed += windows(take_and_keep(loader, steps))
        state = loader.state_dict()
    assert consumed == reference_windows(corpus, state)


def test_seq_len_change_continues_at_the_token_offset(corpus):
    """Unshuffled, a stream is read in token order, so a new seq_len continues at the exact token."""
    first = TokenLoader(cfg(corpus, seq_len=16, micro_batch_size=1, num_streams=1, shuffle=False))
    take_and_keep(first, 5)
    second = TokenLoader(cfg(corpus, seq_len=40, micro_batch_size=1, num_streams=1, shuffle=False))
    second.load_state_dict(first.state_dict())
    x, y = take(second, 1)[0]
    whole = take(TokenLoader(cfg(corpus, seq_len=200, micro_batch_size=1, num_streams=1, shuffle=False)), 1)[
        0
    ]
    assert x[0] == whole[0][0][80:120] and y[0] == whole[1][0][80:120]


def test_mismatched_state_is_refused_clearly(corpus, tmp_path):
    loader = TokenLoader(cfg(corpus, num_streams=2))
    take_and_keep(loader, 3)
    state = loader.state_dict()
    other = make_prepared(tmp_path, n_docs=40)
    with pytest.raises(ValueError, match="fingerprint"):
        TokenLoader(cfg(other, num_streams=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(cfg(corpus, seed=5)).load_state_dict(state)
    with pytest.raises(ValueError, match="2 streams"):
        TokenLoader(cfg(corpus), world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_streams=2"):
        TokenLoader(cfg(corpus, num_streams=3)).load_state_dict(state)
    with pytest.raises(ValueError, match="split"):
        TokenLoader(cfg(corpus), split="val").load_state_dict(state)
    with pytest.raises(ValueError, match="malformed"):
        TokenLoader(cfg(corpus)).load_state_dict({**state, "base_offsets": [0]})
    with pytest.raises(ValueError, match="version"):
        TokenLoader(cfg(corpus)).load_state_dict({"hello": 1})


def test_reloading_state_mid_iteration_is_an_error(corpus):
    loader = TokenLoader(cfg(corpus))
    it = iter(loader)
    next(it)
    loader.load_state_dict(loader.state_dict())
    with pytest.raises(RuntimeError, match="load_state_dict"):
        next(it)
