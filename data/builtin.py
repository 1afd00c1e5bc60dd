"""The built-in corpus, prepared on first use so that training needs no download."""

from __future__ import annotations

import fcntl
from pathlib import Path

from .manifest import MANIFEST, load_manifest
from .prepare import BUILTIN_PATH, prepare
from .tokenizer import HFTokenizer


def ensure_builtin_corpus(path: str = BUILTIN_PATH, tokenizer: str = "byte") -> str:
    """Prepare the built-in stdlib corpus at `path` unless it is already there; returns `path`.

    Safe to call from every rank: a lock file serialises ranks sharing a filesystem and the atomic
    rename in `prepare` settles races the lock cannot see (e.g. across nodes on NFS).
    """
    if not (Path(path) / MANIFEST).exists():
        Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path.rstrip('/')}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (Path(path) / MANIFEST).exists():
                prepare(None, path, tokenizer=tokenizer)
    have = load_manifest(path).tokenizer
    want = "byte" if tokenizer == "byte" else "bpe:8192" if tokenizer == "bpe" else None
    same = have["spec"] == want if want else have.get("sha256") == HFTokenizer.from_file(tokenizer).sha256()
    if not same:
        raise ValueError(
            f"{path} was prepared with tokenizer {have['spec']!r}, not {tokenizer!r}; "
            f"use another path or delete it"
        )
    return path
