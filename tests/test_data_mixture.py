"""Weighted corpus mixtures (data.mixture): shares, determinism, exact resume, tokens per corpus, bad input."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
from test_data_common import take
from tiny import TINY
from train_runs import run_train

from data import DataConfig, DataError, TokenLoader
from data.mixture import BLOCK, MixtureEntry, RowSchedule
from data.prepare import prepare
from data.tokenizer import train_bpe

pytestmark = pytest.mark.timeout(60)
LETTERS = "abc"  # corpus k's documents are made of LETTERS[k] only, so a row names its corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("mixture")
    out = []
    for k, letter in enumerate(LETTERS):
        src = tmp / f"src{k}"
        src.mkdir()
        for i in range(40):
            (src / f"d{i}.txt").write_text(" ".join(letter * (1 + (i * j) % 7) for j in range(60 + 10 * k)))
        prepare(
            [str(src)], str(tmp / f"corpus_{letter}"), progress=False, val_fraction=0.1, shard_size_mb=1 / 256
        )
        out.append(str(tmp / f"corpus_{letter}"))
    return out


def mix(corpora: list[str], weights=(1, 2, 5), **kw) -> DataConfig:
    kw.setdefault("seq_len", 16)
    kw.setdefault("micro_batch_size", 4)
    return DataConfig(mixture=[MixtureEntry(p, w) for p, w in zip(corpora, weights, strict=True)], **kw)


def corpus_of(row: list[int]) -> int:
    letters = {chr(t) for t in row if t < 256 and chr(t).isalpha()}
    assert len(letters) == 1, letters  # windows never mix corpora
    return LETTERS.index(letters.pop())


def test_rows_follow_the_weights_exactly_per_block(corpora):
    batches = take(TokenLoader(mix(corpora)), 2 * BLOCK // 4)  # two blocks of the row schedule
    counts = Counter(corpus_of(r) for x, _ in batches for r in x)
    assert [counts[k] for k in range(3)] == [256, 512, 1280]  # 2 x largest-remainder of 1024 x (1, 2, 5)/8
    sched = RowSchedule([0.5, 0.25, 0.25], seed=3)
    assert [sched.rows(0, t).tolist() for t in (0, BLOCK, 2 * BLOCK)] == [
        [0, 0, 0],
        [512, 256, 256],
        [1024, 512, 512],
    ]
    assert [int(sched.rows(1, 100)[c]) for c in range(3)] == [
        sum(sched.corpus_of(1, t) == c for t in range(100)) for c in range(3)
    ]


def test_mixture_is_deterministic_and_resumes_exactly(corpora):
    config = mix(corpora, num_workers=2)
    reference = take(TokenLoader(config), 12)
    assert reference == take(TokenLoader(config), 12)
    first = TokenLoader(config)
    it = iter(first)
    head = [(x.tolist(), y.tolist()) for x, y in itertools.islice(it, 5)]
    it.close()
    state = json.loads(json.dumps(first.state_dict()))
    assert [p["path"] for p in state["mixture"]] == corpora
    second = TokenLoader(config)
    second.load_state_dict(state)
    assert head + take(second, 7) == reference


def test_tokens_per_corpus_and_a_new_layout_or_weights(corpora):
    loader = TokenLoader(mix(corpora), rank=0, world_size=2)
    it = iter(loader)
    rows = Counter(corpus_of(r) for x, _ in itertools.islice(it, 30) for r in x.tolist())
    it.close()
    seen = loader.tokens_per_corpus()  # both ranks (same schedule per slot count), 16 tokens per row
    assert list(seen) == ["corpus_a", "corpus_b", "corpus_c"] and sum(seen.values()) == 2 * 30 * 4 * 16
    assert seen["corpus_a"] >= 16 * rows[0]
    state = loader.state_dict()
    again = TokenLoader(mix(corpora, weights=(1, 1, 1)), rank=0, world_size=1)  # new weights and world size
    again.load_state_dict(state)
    assert again.tokens_per_corpus() == seen  # re-based: every stream continues at its offset
    take_and_count = Counter(corpus_of(r) for x, _ in take(again, BLOCK // 4) for r in x)
    assert [take_and_count[k] for k in range(3)] == [342, 341, 341]


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, "heavy"])
def test_bad_weights_name_the_corpus(corpora, weight):
    with pytest.raises(ValueError, match=rf"data.mixture: corpus {corpora[1]}: weight .* finite number > 0"):
        TokenLoader(mix(corpora, weights=(1, weight, 1)))


def test_missing_corpus_and_other_tokenizer_name_the_corpus(corpora, tmp_path):
    with pytest.raises(DataError, match=f"corpus {tmp_path}/nowhere: no manifest.json"):
        TokenLoader(mix([corpora[0], str(tmp_path / "nowhere")], weights=(1, 1)))
    tok = tmp_path / "tokenizer.json"
    tok.write_text(train_bpe(["a b c " * 50], 300).to_str())
    prepare([f"{corpora[0]}/../src0"], str(tmp_path / "bpe"), tokenizer=str(tok), progress=False, workers=1)
    with pytest.raises(
        ValueError, match=f"corpus {tmp_path}/bpe was tokenized with .*, corpus {corpora[0]} with 'byte'"
    ):
        TokenLoader(mix([corpora[0], str(tmp_path / "bpe")], weights=(1, 1)))


@pytest.mark.timeout(120)
def test_training_on_a_mixture_logs_tokens_per_corpus(corpora, tmp_path):
    mixture = ", ".join(f"{{path: '{p}', weight: {w}}}" for p, w in zip(corpora, (1, 2, 5), strict=True))
    run = run_train(
        tmp_path, [*TINY, f"data.mixture=[{mixture}]", "trainer.max_steps=2", "model.vocab_size=null"]
    )
    assert run.returncode == 0, run.output[-3000:]
    last = [r for r in run.metrics() if "data/tokens/corpus_c" in r][-1]
    assert sum(last[f"data/tokens/corpus_{c}"] for c in LETTERS) == last["train/tokens"] == 2 * 2 * 32
