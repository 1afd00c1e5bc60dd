"""Bad input: each case is a clear error or a counted, logged, documented skip; never a hang."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_data_common import cfg, make_prepared, take, write_corpus

from data import DataError, TokenLoader
from data.manifest import MANIFEST, Manifest, load_manifest, write_manifest
from data.prepare import prepare

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def corpus(tmp_path) -> str:
    """A private copy per test, since these tests damage it."""
    return make_prepared(tmp_path)


def first_shard(path: str) -> Path:
    return Path(path) / load_manifest(path).shards("train")[0].name


def flip_byte(p: Path, offset: int) -> None:
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def read_all_train(path: str, **kw) -> None:
    loader = TokenLoader(cfg(path, num_streams=1, **kw))
    take(loader, 10**4)  # far more than one epoch: every shard is read


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_a_clear_error(corpus, workers):
    shard = first_shard(corpus)
    flip_byte(shard, shard.stat().st_size // 2)
    with pytest.raises(DataError, match=f"{shard.name}.*sha256"):
        take(TokenLoader(cfg(corpus, num_streams=2, num_workers=workers)), 10**4)


def test_corrupt_tar_header_without_checksums(corpus):
    flip_byte(first_shard(corpus), 0)  # the first member's name: the tar no longer parses
    with pytest.raises(DataError, match="not a readable webdataset tar|manifest does not match"):
        read_all_train(corpus, verify_checksums=False)


@pytest.mark.parametrize("workers", [0, 1])
def test_token_ids_outside_the_vocabulary_without_checksums(corpus, workers):
    """Random bytes in a document's tokens (npy payload after the 512-byte tar and 128-byte npy headers)."""
    shard = first_shard(corpus)
    data = bytearray(shard.read_bytes())
    data[512 + 128 : 512 + 128 + 8] = b"\x38\xff" * 4  # uint16 id 65336, vocabulary 259
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name}: token id 65336 is outside the vocabulary of 259"):
        read_all_train(corpus, verify_checksums=False, num_workers=workers)


def test_truncated_shard(corpus):
    shard = first_shard(corpus)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated"):
        TokenLoader(cfg(corpus))  # local shards are checked at start-up
    with pytest.raises(DataError, match="bytes, the manifest says"):  # a URL is checked as it is read
        read_all_train(f"pipe:cat {corpus}/{{name}}")


def test_missing_shard(corpus):
    first_shard(corpus).unlink()
    with pytest.raises(DataError, match="missing"):
        TokenLoader(cfg(corpus))
    with pytest.raises(DataError, match="could not read"):
        read_all_train(f"pipe:cat {corpus}/{{name}}")


def test_manifest_that_does_not_match_the_shards(corpus):
    path = Path(corpus) / MANIFEST
    d = json.loads(path.read_text())
    d["splits"]["train"]["shards"][0]["tokens"] += 1  # edited by hand: totals no longer add up
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="totals do not add up"):
        TokenLoader(cfg(corpus))
    d["splits"]["train"]["tokens"] += 1  # totals fixed too, but the fingerprint no longer matches
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="fingerprint"):
        TokenLoader(cfg(corpus))
    # The same edit with a matching fingerprint: the manifest is consistent, the shard disagrees.
    write_manifest(corpus, _refingerprint(d))
    with pytest.raises(DataError, match="manifest does not match shard"):
        read_all_train(corpus)


def _refingerprint(d: dict) -> Manifest:
    from data.manifest import ShardInfo

    splits = {k: [ShardInfo(**s) for s in v["shards"]] for k, v in d["splits"].items()}
    return Manifest(tokenizer=d["tokenizer"], dtype=d["dtype"], splits=splits)


def test_missing_or_broken_manifest(tmp_path, corpus):
    with pytest.raises(DataError, match="prepare the corpus first"):
        TokenLoader(cfg(str(tmp_path / "nowhere")))
    (Path(corpus) / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenLoader(cfg(corpus))
    with pytest.raises(DataError, match="could not read"):
        TokenLoader(cfg("pipe:exit 3 {name}"))


def test_bad_inputs_are_skipped_counted_and_logged(tmp_path, caplog):
    src = write_corpus(tmp_path / "src", 12)
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    os.symlink(tmp_path / "does-not-exist", src / "dangling.txt")  # listed, but cannot be opened
    (src / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (src / "empty.txt").write_text("")
    lines = [
        json.dumps({"text": "good line"}),
        "{broken json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": ""}),
    ]
    (src / "records.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    with caplog.at_level(logging.WARNING, logger="data.prepare"):
        man = prepare(
            [str(src)], str(tmp_path / "out"), workers=1, progress=False, val_fraction=0, shard_size_mb=1
        )
    skipped = {k: v["count"] for k, v in man["skipped"].items()}
    assert skipped == {"unreadable": 2, "non_utf8": 2, "bad_json": 2, "empty": 2, "too_large": 0}
    assert man["splits"]["train"]["documents"] == 12 + 1  # the corpus plus the one good JSON line
    assert any("latin1.txt" in e for e in man["skipped"]["non_utf8"]["examples"])
    assert any("dangling.txt" in e for e in man["skipped"]["unreadable"]["examples"])
    for name in ("latin1.txt", "dangling.txt", "broken.txt.gz", "records.jsonl"):
        assert name in caplog.text
    assert "skipped 8 inputs: 2 unreadable, 2 not UTF-8, 2 bad JSON lines, 2 empty" in caplog.text
    with pytest.raises(DataError, match="strict"):
        prepare([str(src)], str(tmp_path / "strict"), workers=1, progress=False, strict=True)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob("strict.partial*"))


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare([str(tmp_path / "empty_dir")], str(tmp_path / "o1"), progress=False)
    with pytest.raises(DataError, match="matches no file"):
        prepare([str(tmp_path / "nope/*.txt")], str(tmp_path / "o2"), progress=False)
    (tmp_path / "blank").mkdir()
    for i in range(3):
        (tmp_path / "blank" / f"{i}.txt").write_text("")
    with gzip.open(tmp_path / "blank" / "x.jsonl.gz", "wt") as f:
        f.write("\n\n")
    with pytest.raises(DataError, match="no documents to train on"):
        prepare([str(tmp_path / "blank")], str(tmp_path / "o3"), workers=1, progress=False)
    assert not (tmp_path / "o3").exists()


def test_empty_val_split_is_a_clear_error(tmp_path):
    path = make_prepared(tmp_path, n_docs=6, val_fraction=0.0)
    assert load_manifest(path).shards("val") == []
    with pytest.raises(DataError, match="no shards"):
        TokenLoader(cfg(path), split="val")
    shutil.rmtree(path)
