"""Streaming loader: batch format, packing, determinism, rank/worker split, URLs, epochs, val."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from test_data_common import cfg, make_prepared, take, windows

from data import DataError, TokenLoader
from data.manifest import ShardInfo, load_manifest
from data.order import StreamPlan, permutation
from data.shards import read_shard
from data.stream import TokenStream
from data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_prepared(tmp_path_factory.mktemp("corpus"))


def test_batches_are_packed_next_token_pairs(corpus):
    loader = TokenLoader(cfg(corpus, seq_len=32, micro_batch_size=3))
    assert (loader.vocab_size, loader.bos_id, loader.eos_id, loader.pad_id) == (259, 256, 257, 258)
    seen_eos = False
    for x, y in take(loader, 20):
        x, y = torch.tensor(x), torch.tensor(y)
        assert x.shape == y.shape == (3, 32)
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
        assert int(x.max()) < loader.vocab_size and not (x == loader.pad_id).any()  # no padding
        seen_eos |= bool((x == loader.eos_id).any())
    assert seen_eos
    x, _ = next(iter(loader))
    assert x.dtype == torch.int64 and x.is_contiguous()


def test_one_epoch_covers_every_document_once(corpus):
    """Single unshuffled stream: windows overlap by one token, so they rebuild the packed stream of epoch 0."""
    man = load_manifest(corpus)
    epoch_tokens = sum(s.stream_tokens for s in man.shards("train"))
    T = 16
    loader = TokenLoader(cfg(corpus, seq_len=T, micro_batch_size=1, shuffle=False, num_streams=1))
    batches = take(loader, -(-(epoch_tokens - 1) // T))
    stream = np.array(batches[0][0][0][:1] + [t for _, y in batches for t in y[0]])[:epoch_tokens]
    assert stream[-1] == 257  # the epoch ends with a document's EOS
    got = Counter(tuple(d) for d in np.split(stream, np.where(stream == 257)[0] + 1) if len(d))
    want = Counter()
    for s in man.shards("train"):
        for d in read_shard(f"{corpus}/{s.name}", s, man.dtype):
            want[tuple(d.tolist()) + (257,)] += 1
    assert got == want and sum(want.values()) == sum(s.documents for s in man.shards("train"))


class GridOrder(StreamPlan):
    """The shuffled plan's shard and document order, but every visit's windows in grid order."""

    def window_order(self, epoch: int, shard: int, count: int) -> np.ndarray:
        return np.arange(count)


def test_shuffled_windows_of_an_epoch_are_the_packed_windows_permuted(corpus):
    man = load_manifest(corpus)
    shards = man.shards("train")
    T = 16
    n = -(-sum(s.stream_tokens for s in shards) // T)  # the grid points of epoch 0
    got = [
        tuple(x[0]) + (y[0][-1],)
        for x, y in take(TokenLoader(cfg(corpus, seq_len=T, micro_batch_size=1, num_streams=1)), n)
    ]
    grid = TokenStream(
        GridOrder(shards, 1, seed=1234),
        0,
        0,
        lambda i: read_shard(f"{corpus}/{shards[i].name}", shards[i], man.dtype),
        257,
        man.dtype,
    )
    want = [tuple(grid.take(T).tolist()) for _ in range(n)]
    assert Counter(got) == Counter(want) and got != want
    adjacent = sum(a[-1:] == b[:1] and a[1:] != b[:-1] for a, b in itertools.pairwise(got))
    assert adjacent < n // 4  # consecutive reads are not consecutive windows


def test_deterministic_and_seeded(corpus):
    a = take(TokenLoader(cfg(corpus)), 15)
    assert a == take(TokenLoader(cfg(corpus)), 15)
    assert a != take(TokenLoader(cfg(corpus, seed=7)), 15)
    unshuffled = take(TokenLoader(cfg(corpus, shuffle=False, seq_len=8)), 1)[0][0][0]
    first_doc = ByteTokenizer().decode(unshuffled)
    assert first_doc.startswith("<0> ")  # stored order: the first document of the first shard


def test_epochs_partition_shards_among_streams():
    infos = [ShardInfo(f"s{i}", 1, 10, 0, "") for i in range(7)]
    for streams in (1, 2, 3, 7):
        plan = StreamPlan(infos, streams, seed=3)
        visits = [plan.visit(s, k) for s in range(streams) for k in range(7 * 3 // streams + 3)]
        for epoch in range(2):
            assert sorted(sh for e, sh in visits if e == epoch) == list(range(7))
    assert not np.array_equal(permutation(50, 1, 0), permutation(50, 1, 1))
    assert sorted(permutation(50, 9).tolist()) == list(range(50))


def test_ranks_read_disjoint_streams(corpus):
    r0 = take(TokenLoader(cfg(corpus), rank=0, world_size=2), 10)
    r1 = take(TokenLoader(cfg(corpus), rank=1, world_size=2), 10)
    assert not set(windows(r0)) & set(windows(r1))


def test_workers_give_the_same_windows_deterministically(corpus):
    """Same streams (num_streams=2), read by one process or by 2 workers: same data, fixed order."""
    with_workers = take(TokenLoader(cfg(corpus, num_streams=2, num_workers=2)), 12)
    assert with_workers == take(TokenLoader(cfg(corpus, num_streams=2, num_workers=2)), 12)
    in_process = take(TokenLoader(cfg(corpus, num_streams=2, num_workers=0)), 12)
    assert windows(with_workers) == windows(in_process)


def test_pipe_url_reads_like_local_path(corpus):
    local = take(TokenLoader(cfg(corpus)), 8)
    assert take(TokenLoader(cfg(f"pipe:cat {corpus}/{{name}}")), 8) == local
    assert take(TokenLoader(cfg(f"file://{corpus}")), 8) == local


def test_train_stream_is_infinite_across_epochs(corpus):
    loader = TokenLoader(cfg(corpus, seq_len=32, micro_batch_size=4))
    n = 3 * loader.batches_per_epoch
    it = iter(loader)
    for _ in range(n):
        next(it)
    it.close()
    assert loader.epoch >= 2
    assert loader.state_dict()["epoch"] == loader.epoch
    with pytest.raises(TypeError):
        len(loader)


def test_val_is_one_equal_pass_per_rank(corpus):
    val = TokenLoader(cfg(corpus), split="val")
    full = take(val, 10**6)
    assert len(full) == len(val) > 0 and full == take(val, 10**6)
    ranks = [take(TokenLoader(cfg(corpus), rank=r, world_size=3, split="val"), 10**6) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(val) // 3
    assert sum(ranks, []) == full[: 3 * len(ranks[0])]
    with pytest.raises(DataError, match="fewer than one micro-batch"):
        TokenLoader(cfg(corpus, seq_len=4096), split="val")


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(cfg(corpus), rank=2, world_size=2)
    with pytest.raises(ValueError, match="only .* train shard"):
        TokenLoader(cfg(corpus, num_workers=8), world_size=64)
    with pytest.raises(ValueError, match="split"):
        TokenLoader(cfg(corpus), split="test")
    with pytest.raises(ValueError, match="seq_len"):
        cfg(corpus, seq_len=0)
