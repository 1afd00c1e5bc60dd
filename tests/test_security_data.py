"""Issue 17, corpora: a manifest or a shard someone else wrote cannot run code, escape the corpus or hang."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from test_data_common import cfg, make_prepared, take

from data import DataError, TokenLoader
from data.manifest import load_manifest, location, read_bytes, write_manifest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def corpus(tmp_path) -> str:
    return make_prepared(tmp_path, n_docs=24)


def rename_shards(path: str, name_of) -> None:
    """Rewrite the manifest as an attacker would: shard entries changed, the fingerprint recomputed."""
    man = load_manifest(path)
    for split, shards in man.splits.items():
        man.splits[split] = [dataclasses.replace(s, name=name_of(i, s)) for i, s in enumerate(shards)]
    write_manifest(path, man)


def test_shell_in_a_shard_name_is_refused_before_any_command_runs(corpus, tmp_path):
    marker = tmp_path / "PWNED"
    rename_shards(corpus, lambda i, s: f"{s.name}; touch {marker}; echo ")
    with pytest.raises(DataError, match="is not a plain file name ending in .tar"):
        take(TokenLoader(cfg(f"pipe:cat {corpus}/{{name}}", num_streams=1)), 4)
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["../outside.tar", "sub/x.tar", "/dev/zero", "-n.tar", "x.tar.gz"])
def test_shard_names_that_leave_the_corpus_are_refused(corpus, bad):
    rename_shards(corpus, lambda i, s: bad if i == 0 else s.name)
    with pytest.raises(DataError, match=f"shard name {bad!r} is not a plain file name"):
        TokenLoader(cfg(corpus))


def test_a_pipe_template_gets_names_shell_quoted():
    assert location("pipe:cat /c/{name}", "a b;c.tar") == "pipe:cat /c/'a b;c.tar'"
    assert location("pipe:cat /c/{name}", "train-000001.tar") == "pipe:cat /c/train-000001.tar"
    assert location("https://h/c/{name}", "train-000001.tar") == "https://h/c/train-000001.tar"


def test_quoted_pipe_template_reads_a_corpus_in_a_directory_with_a_space(tmp_path):
    spaced = tmp_path / "my corpus"
    spaced.mkdir()
    path = make_prepared(spaced, n_docs=24)
    assert " " in path
    local = take(TokenLoader(cfg(path, num_streams=2)), 6)
    piped = take(TokenLoader(cfg(f'pipe:cat "{path}/{{name}}"', num_streams=2)), 6)
    assert piped == local and len(piped) == 6


def test_fingerprint_error_does_not_print_the_value_to_forge(corpus):
    man = load_manifest(corpus)
    text = (Path(corpus) / "manifest.json").read_text()
    shard = man.shards("train")[0]
    forged = text.replace(f'"tokens": {shard.tokens},', f'"tokens": {shard.tokens + 1},', 1)
    forged = forged.replace(
        f'"tokens": {sum(s.tokens for s in man.shards("train"))}',
        f'"tokens": {sum(s.tokens for s in man.shards("train")) + 1}',
    )
    (Path(corpus) / "manifest.json").write_text(forged)
    man.splits["train"][0] = dataclasses.replace(shard, tokens=shard.tokens + 1)
    with pytest.raises(DataError, match="does not match its content") as e:
        load_manifest(corpus)
    assert man.compute_fingerprint() not in str(e.value)


def test_expect_fingerprint_pins_the_corpus(corpus, tmp_path):
    right = load_manifest(corpus).fingerprint
    assert len(take(TokenLoader(cfg(corpus, expect_fingerprint=right)), 2)) == 2
    other = make_prepared(tmp_path / "other", n_docs=30)  # a valid corpus, just not the pinned one
    with pytest.raises(DataError, match="not the one data.expect_fingerprint pins") as e:
        TokenLoader(cfg(other, expect_fingerprint=right))
    assert right not in str(e.value)
    with pytest.raises(ValueError, match="only with verify_checksums=true"):
        cfg(corpus, expect_fingerprint=right, verify_checksums=False)


def test_device_shard_is_not_read(corpus):
    shard = Path(corpus) / load_manifest(corpus).shards("train")[0].name
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is not a regular file"):
        TokenLoader(cfg(corpus))
    with pytest.raises(DataError, match="is not a regular file"):
        read_bytes(str(shard), 1000)


def test_fifo_shard_is_an_error_not_a_hang(corpus):
    shard = Path(corpus) / load_manifest(corpus).shards("train")[0].name
    shard.unlink()
    os.mkfifo(shard)  # no writer: a blocking open would wait forever
    with pytest.raises(DataError, match="is not a regular file"):
        TokenLoader(cfg(corpus))
    with pytest.raises(DataError, match="is not a regular file"):
        read_bytes(str(shard), 1000)


def test_endless_remote_stream_is_cut_at_the_listed_size():
    with pytest.raises(DataError, match="holds more than the 4096 bytes expected"):
        read_bytes("pipe:cat /dev/zero", 4096)


def test_shards_without_documents_are_refused(corpus):
    man = load_manifest(corpus)
    man.splits["train"] = [dataclasses.replace(s, documents=0, tokens=0) for s in man.splits["train"]]
    write_manifest(corpus, man)
    with pytest.raises(DataError, match="holds 0 documents / 0 tokens"):
        TokenLoader(cfg(corpus))


def test_absurd_resume_offsets_are_an_error_not_a_hang(corpus):
    loader = TokenLoader(cfg(corpus, num_streams=2))
    state = loader.state_dict()
    with pytest.raises(DataError, match="more than 10000 epochs into this corpus"):
        TokenLoader(cfg(corpus, num_streams=2)).load_state_dict({**state, "base_offsets": [0, 10**18]})
    with pytest.raises(ValueError, match="malformed data loader state: layout"):
        TokenLoader(cfg(corpus, num_streams=2)).load_state_dict({**state, "world_size": 10**12})
