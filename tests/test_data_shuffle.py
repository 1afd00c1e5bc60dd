"""Shuffled sequences: every row of a micro-batch an independent draw (the issue-14 corpus and figures)."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from data import DataConfig, TokenLoader
from data.prepare import prepare

pytestmark = pytest.mark.timeout(60)
_TAG = re.compile(r"(?:^|\s)(\d{4})[a-z]")  # every word of document i starts with i as 4 digits


@pytest.fixture(scope="module")
def issue_corpus(tmp_path_factory) -> str:
    """3000 documents of ~1400 bytes, byte tokenizer: the corpus the issue measured on."""
    tmp = tmp_path_factory.mktemp("mixing")
    rng = random.Random(0)
    with open(tmp / "docs.jsonl", "w") as f:
        for i in range(3000):
            words = [f"{i:04d}" + "".join(rng.choices("abcdefgh", k=rng.randint(3, 9))) for _ in range(140)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    prepare([str(tmp / "docs.jsonl")], str(tmp / "prepared"), progress=False)
    return str(tmp / "prepared")


def row_documents(row: list[int]) -> list[int]:
    """Documents a row's text comes from, in order (EOS and other specials read as a newline)."""
    text = bytes(t if t < 256 else 10 for t in row).decode("utf-8", errors="replace")
    return [int(m) for m in _TAG.findall(text)]


def mixing(loader: TokenLoader, steps: int) -> tuple[float, float]:
    """(distinct documents per batch / rows, share of rows that continue the document their row held one
    step before), each row's document being the one it starts in."""
    distinct, continuing, rows, previous = 0, 0, 0, None
    for x, _ in itertools.islice(iter(loader), steps):
        docs = [row_documents(r) for r in x.tolist()]
        distinct += len({d[0] for d in docs})
        if previous is not None:
            continuing += sum(d[0] == p[-1] for d, p in zip(docs, previous, strict=True))
        rows, previous = rows + len(docs), docs
    return distinct / rows, continuing / (rows - len(docs))


@pytest.mark.parametrize("streams", [1, 0])
def test_rows_of_a_batch_are_independent_draws(issue_corpus, streams):
    """Goal: >= 90% distinct documents per batch, <= 5% of rows continuing their document, even when all
    rows come from one stream (the issue's case: one rank, num_streams = 1)."""
    config = DataConfig(path=issue_corpus, seq_len=128, micro_batch_size=8, num_streams=streams)
    distinct, continuing = mixing(TokenLoader(config), 200)
    assert distinct >= 0.9 and continuing <= 0.05, (distinct, continuing)
    config.shuffle = False
    distinct, continuing = mixing(TokenLoader(config), 200)  # the measurement can fail: stored order
    assert distinct < 0.5 or continuing > 0.2, (distinct, continuing)
