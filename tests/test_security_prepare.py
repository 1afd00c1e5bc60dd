"""Issue 17, prepare inputs: a gzip bomb is a counted skip, not a MemoryError; a FIFO is skipped, not a hang."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from test_data_common import write_corpus

from data import sources
from data.prepare import prepare

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def small_cap(monkeypatch) -> int:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 20)
    return 1 << 20


def test_gzip_bombs_are_counted_too_large_skips(tmp_path, small_cap):
    src = write_corpus(tmp_path / "src", n_docs=8)
    zeros = bytes(1 << 20)
    with gzip.open(src / "bomb.txt.gz", "wb") as f:  # 16 MB of zeros in ~16 KB: 16x the cap
        for _ in range(16):
            f.write(zeros)
    with gzip.open(src / "lines.jsonl.gz", "wb") as f:  # one line over the cap between two good ones
        f.write(json.dumps({"text": "before"}).encode() + b"\n")
        f.write(b'{"text": "' + b"a" * (3 * small_cap) + b'"}\n')
        f.write(json.dumps({"text": "after"}).encode() + b"\n")
    assert (src / "bomb.txt.gz").stat().st_size < small_cap // 8
    man = prepare(
        [str(src)], str(tmp_path / "out"), workers=1, progress=False, val_fraction=0.0, shard_size_mb=1
    )
    skipped = man["skipped"]["too_large"]
    assert skipped["count"] == 2
    assert any("bomb.txt.gz" in e for e in skipped["examples"])
    assert any("lines.jsonl.gz line 2" in e for e in skipped["examples"])
    assert man["splits"]["train"]["documents"] == 8 + 2  # the corpus, "before" and "after"


def test_fifo_inputs_are_skipped_not_waited_for(tmp_path):
    src = write_corpus(tmp_path / "src", n_docs=8)
    os.mkfifo(src / "stuck.txt")  # no writer: a blocking open would wait forever
    man = prepare(
        [str(src)], str(tmp_path / "out"), workers=1, progress=False, val_fraction=0.0, shard_size_mb=1
    )
    unreadable = man["skipped"]["unreadable"]
    assert unreadable["count"] == 1 and "is not a regular file" in unreadable["examples"][0]
    assert man["splits"]["train"]["documents"] == 8
