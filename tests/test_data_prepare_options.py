"""`data.prepare` over an existing output, files it does not read, and corpora too small for the default shards."""

from __future__ import annotations

import logging
import random

import pytest
from test_data_common import WORDS, cfg, take, write_corpus

from data import DataError, TokenLoader
from data.manifest import load_manifest
from data.prepare import main, prepare

pytestmark = pytest.mark.timeout(60)


def test_other_options_over_an_existing_output_are_an_error_naming_them(tmp_path, caplog):
    src = write_corpus(tmp_path / "src", 12)
    out = str(tmp_path / "out")
    first = prepare([str(src)], out, workers=1, progress=False)
    with pytest.raises(DataError) as e:
        prepare([str(src)], out, workers=1, progress=False, val_fraction=0.2, text_field="body")
    msg = str(e.value)
    assert "--val-fraction 0.01 (asked: 0.2)" in msg and "--text-field text (asked: body)" in msg
    assert "--overwrite" in msg and "\n" not in msg
    assert load_manifest(out).fingerprint == first["fingerprint"]  # the old corpus is untouched
    with caplog.at_level(logging.ERROR, logger="data.prepare"):
        assert main([str(src), "-o", out, "--val-fraction", "0.2"]) == 1
    assert "--val-fraction 0.01 (asked: 0.2)" in caplog.text
    assert main([str(src), "-o", out, "--val-fraction", "0.2", "--overwrite", "--quiet"]) == 0
    assert load_manifest(out).source["options"]["val_fraction"] == 0.2
    assert main([str(src), "-o", out, "--val-fraction", "0.2", "--quiet"]) == 0  # the same options: a no-op


def test_files_of_other_types_are_counted_by_extension(tmp_path, caplog):
    src = write_corpus(tmp_path / "src", 6)
    for i in range(3):
        (src / f"page{i}.rst").write_text("not read")
    (src / "Makefile").write_text("not read")
    with caplog.at_level(logging.INFO, logger="data.prepare"):
        man = prepare([str(src)], str(tmp_path / "out"), workers=1, progress=False)
    assert man["source"]["not_searched"] == {".rst": 3, "": 1}
    assert "skipped 4 files in the input folders: 3 .rst, 1 (no extension)" in caplog.text


def test_a_tiny_corpus_fills_eight_slots_and_a_val_split(tmp_path):
    """The issue's case: 5 files, ~28 KB, the defaults: 2 ranks x 4 workers can read it, val is not empty."""
    rng = random.Random(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(900)))
    total = sum(p.stat().st_size for p in src.iterdir())
    assert 20_000 < total < 40_000
    out = str(tmp_path / "out")
    man = prepare([str(src)], out, progress=False)
    assert len(man["splits"]["train"]["shards"]) >= 8
    assert man["splits"]["val"]["documents"] >= 1
    tokens = sum(s["tokens"] for sp in man["splits"].values() for s in sp["shards"])
    assert tokens == total  # byte tokenizer: every input byte is kept, only cut into pieces
    for rank in range(2):
        slots = TokenLoader(
            cfg(out, num_workers=4), rank=rank, world_size=2
        )  # its checks, no workers started
        assert slots.state_dict()["num_streams"] >= 8
        assert len(take(TokenLoader(cfg(out, seq_len=64), rank=rank, world_size=2), 2)) == 2
    val = TokenLoader(cfg(out, seq_len=256, micro_batch_size=4), rank=1, world_size=2, split="val")
    assert len(list(val)) >= 1  # a micro-batch per rank at the trainer's default batch shape
