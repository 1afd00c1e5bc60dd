"""Webdataset tar shards of pre-tokenized documents: writing them at a target size, reading them back verified.

Each document is one sample `<key>.tokens.npy` (a 1-D uint16/uint32 array), so the shards are plain
webdataset tars that any webdataset pipeline can read; webdataset is imported lazily because it pulls
in torch, which the tokenizer processes of `prepare` do not need.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .fastread import decode_npy, plain_tar_members
from .manifest import ShardInfo, read_bytes

MEMBER = "tokens.npy"
_BLOCK = 512


def encode_tokens(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Rolls shards named `<prefix>-000000.tar` at ~`target_bytes`; a shard appears under its final
    name only once complete (written to `.partial`, then renamed), with its sha256 recorded."""

    def __init__(self, out_dir: str | Path, prefix: str, target_bytes: int, dtype: str) -> None:
        self.out_dir, self.prefix, self.target, self.dtype = Path(out_dir), prefix, int(target_bytes), dtype
        self.shards: list[ShardInfo] = []
        self._tar = None
        self._file = None
        self._docs = self._tokens = self._size = 0

    def _open(self) -> None:
        from webdataset import TarWriter

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._path = self.out_dir / name
        self._file = open(str(self._path) + ".partial", "wb")
        # Fixed mtime/user: the same input gives byte-identical shards (and checksums).
        self._tar = TarWriter(self._file, encoder=False, mtime=0, user="data", group="data")
        self._docs = self._tokens = self._size = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        payload = encode_tokens(tokens.astype(self.dtype, copy=False))
        self._tar.write({"__key__": f"{self._docs:08d}", MEMBER: payload})
        self._docs += 1
        self._tokens += int(tokens.size)
        self._size += _BLOCK + -(-len(payload) // _BLOCK) * _BLOCK
        if self._size >= self.target:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        partial = Path(str(self._path) + ".partial")
        os.replace(partial, self._path)
        self.shards.append(
            ShardInfo(
                name=self._path.name,
                documents=self._docs,
                tokens=self._tokens,
                bytes=self._path.stat().st_size,
                sha256=_file_sha256(self._path),
            )
        )
        self._tar = self._file = None

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards


def read_shard(url: str, info: ShardInfo, dtype: str, verify: bool = True) -> list[np.ndarray]:
    """All documents of one shard, in stored order; any mismatch with the manifest is a DataError."""
    try:
        raw = read_bytes(url, info.bytes)  # never more than the manifest lists: no endless stream
    except FileNotFoundError:
        raise DataError(f"shard {url} listed in the manifest does not exist (re-run prepare)") from None
    except OSError as e:
        raise DataError(f"could not read shard {url}: {e}") from None
    if verify:
        if len(raw) != info.bytes:
            raise DataError(
                f"shard {url}: {len(raw)} bytes, the manifest says {info.bytes} "
                f"(truncated or replaced; re-run prepare)"
            )
        digest = hashlib.sha256(raw).hexdigest()
        if digest != info.sha256:
            raise DataError(
                f"shard {url}: sha256 {digest[:12]}... does not match the manifest's "
                f"{info.sha256[:12]}... (corrupt; re-run prepare)"
            )
    docs = _parse(url, raw, dtype)
    if len(docs) != info.documents or sum(int(d.size) for d in docs) != info.tokens:
        raise DataError(
            f"shard {url}: {len(docs)} documents / {sum(int(d.size) for d in docs)} tokens, "
            f"the manifest says {info.documents} / {info.tokens} (manifest does not match shard)"
        )
    return docs


def _parse(url: str, raw: bytes, dtype: str) -> list[np.ndarray]:
    want = np.dtype(dtype)
    try:
        members = plain_tar_members(raw)
        if members is None:  # pax/GNU extensions: leave it to webdataset's (tarfile-based) reader
            from webdataset.tariterators import tar_file_iterator

            members = [(f["fname"], memoryview(f["data"])) for f in tar_file_iterator(io.BytesIO(raw))]
        docs = []
        for name, blob in members:
            if not name.endswith("." + MEMBER):
                raise DataError(f"shard {url}: member {name!r} is not a {MEMBER} document")
            arr = decode_npy(blob, want)
            if arr is None:
                arr = np.load(io.BytesIO(blob), allow_pickle=False)
            if arr.ndim != 1 or arr.dtype != want:
                raise DataError(
                    f"shard {url}: member {name!r} is {arr.dtype}{list(arr.shape)}, expected a 1-D {dtype} array"
                )
            docs.append(arr)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile/numpy raise many types for damaged bytes
        raise DataError(
            f"shard {url} is not a readable webdataset tar ({type(e).__name__}: {e}); "
            f"it is corrupt or truncated (re-run prepare)"
        ) from None
    return docs
