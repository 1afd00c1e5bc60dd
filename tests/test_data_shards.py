"""Shard reading: the fast ustar/npy paths agree with tarfile/np.load, and fall back for other layouts."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data import DataError
from data.fastread import decode_npy, plain_tar_members
from data.manifest import ShardInfo
from data.shards import ShardWriter, encode_tokens, read_shard

pytestmark = pytest.mark.timeout(60)
DOCS = [np.arange(n, dtype=np.uint16) * 7 for n in (1, 5, 300, 2, 1000)]


def info_for(path: Path, docs: list[np.ndarray]) -> ShardInfo:
    raw = path.read_bytes()
    return ShardInfo(
        path.name, len(docs), sum(d.size for d in docs), len(raw), hashlib.sha256(raw).hexdigest()
    )


def test_written_shard_reads_back_through_the_fast_path(tmp_path):
    writer = ShardWriter(tmp_path, "train", target_bytes=1 << 20, dtype="uint16")
    for d in DOCS:
        writer.add(d)
    (info,) = writer.close()
    raw = (tmp_path / info.name).read_bytes()
    members = plain_tar_members(raw)
    assert members is not None and [n for n, _ in members] == [f"{i:08d}.tokens.npy" for i in range(5)]
    with tarfile.open(tmp_path / info.name) as tf:  # the reference reader agrees
        assert [np.load(io.BytesIO(tf.extractfile(m).read())).tolist() for m in tf] == [
            d.tolist() for d in DOCS
        ]
    got = read_shard(str(tmp_path / info.name), info, "uint16")
    assert [d.tolist() for d in got] == [d.tolist() for d in DOCS]


def test_pax_tar_and_other_npy_layouts_fall_back(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, d in enumerate(DOCS):
            blob = encode_tokens(d)
            ti = tarfile.TarInfo(f"{'deep/' * 30}{i:08d}.tokens.npy")  # > 100 chars: needs a pax header
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    assert plain_tar_members(path.read_bytes()) is None
    got = read_shard(str(path), info_for(path, DOCS), "uint16")
    assert [d.tolist() for d in got] == [d.tolist() for d in DOCS]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, DOCS[2], version=(2, 0))
    assert decode_npy(memoryview(buf.getvalue()), np.dtype("uint16")) is None  # np.load handles it
    assert decode_npy(memoryview(encode_tokens(DOCS[2])), np.dtype("uint32")) is None


def test_damaged_members_are_errors(tmp_path):
    writer = ShardWriter(tmp_path, "train", target_bytes=1 << 20, dtype="uint16")
    for d in DOCS:
        writer.add(d)
    (info,) = writer.close()
    path = tmp_path / info.name
    raw = path.read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        plain_tar_members(raw[: len(raw) // 2])
    path.write_bytes(raw[:1536])
    with pytest.raises(DataError, match="truncated"):
        read_shard(str(path), info, "uint16", verify=False)
    with pytest.raises(DataError, match="expected a 1-D uint32"):
        path.write_bytes(raw)
        read_shard(str(path), info, "uint32", verify=False)
