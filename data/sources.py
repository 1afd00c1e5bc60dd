"""Finding input files and turning them into documents, with every skipped input counted by reason.

A `.txt`-like file is one document; a `.jsonl` file gives one document per line (its `text_field`);
`.gz` versions of both are read transparently, streamed: no document (a file, or a `.jsonl` line) may
exceed MAX_DOCUMENT_BYTES once decompressed (a counted `too_large` skip, so a small gzip bomb cannot
exhaust memory). Only regular files are read (a FIFO or device is an `unreadable` skip, never a hang).
Large plain `.jsonl` files are split into byte ranges so the tokenizer processes share them.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import multiprocessing as mp
import os
import stat
import sysconfig
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from .errors import DataError

log = logging.getLogger("data.prepare")

DEFAULT_EXTS = (".txt", ".jsonl", ".md")
SKIP_REASONS = ("unreadable", "non_utf8", "bad_json", "empty", "too_large")
JSONL_SPLIT_BYTES = 64 << 20
MAX_DOCUMENT_BYTES = 256 << 20


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class WorkUnit:
    """A file, or a line-aligned byte range [start, end) of a large plain .jsonl file."""

    path: str
    start: int = 0
    end: int = -1  # -1: to the end of the file


@dataclass
class UnitResult:
    unit: WorkUnit
    docs: list = field(default_factory=list)  # token arrays, in file order
    nbytes: int = 0
    skips: list = field(default_factory=list)  # (reason, "path[:line]: detail")


def builtin_corpus_files() -> list[str]:
    """The running interpreter's standard-library sources: ~30 MB of code and docstrings everywhere."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(os.path.join(dirpath, n) for n in names if n.endswith(".py"))
    if not files:
        raise DataError(f"no .py files under the standard library at {root}")
    return sorted(files)


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def is_jsonl(path: str) -> bool:
    return _strip_gz(path).endswith(".jsonl")


def discover(
    inputs: list[str], exts: tuple[str, ...] = DEFAULT_EXTS, ignored: Counter | None = None
) -> list[str]:
    """Files named by `inputs`: files as given, directories walked for `exts` (and their .gz), globs expanded.
    `ignored` counts the other files of those directories by extension."""
    found: set[str] = set()
    for item in inputs:
        if os.path.isdir(item):
            for root, _dirs, names in os.walk(item):
                for n in names:
                    if _strip_gz(n).endswith(exts):
                        found.add(os.path.join(root, n))
                    elif ignored is not None:
                        ignored[os.path.splitext(n)[1].lower()] += 1
        elif os.path.lexists(item):
            found.add(item)
        else:
            matches = [m for m in glob.glob(item, recursive=True) if not os.path.isdir(m)]
            if not matches:
                raise DataError(f"input {item!r} matches no file or directory")
            found.update(matches)
    if not found:
        raise DataError(f"no input files found in {inputs} (directories are searched for {', '.join(exts)})")
    return sorted(found)


def plan_units(files: list[str], split_bytes: int = JSONL_SPLIT_BYTES) -> list[WorkUnit]:
    units = []
    for f in files:
        size = os.path.getsize(f) if os.path.isfile(f) else 0
        if is_jsonl(f) and not f.endswith(".gz") and size > split_bytes:
            units.extend(WorkUnit(f, s, min(s + split_bytes, size)) for s in range(0, size, split_bytes))
        else:
            units.append(WorkUnit(f))
    return units


@contextlib.contextmanager
def _open(path: str):
    """A regular file for reading (decompressing a .gz); a FIFO or device is an OSError, not a wait."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


def _read_all(path: str) -> bytes:
    with _open(path) as f:
        raw = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _TooLarge(f"{path}: over {MAX_DOCUMENT_BYTES} bytes (decompressed); not read further")
    return raw


def _line(f) -> tuple[bytes, bool]:
    """The next line (b"" at the end), read in bounded pieces: (line, False), or (b"\n", True) for a line
    over MAX_DOCUMENT_BYTES, which is consumed without being kept."""
    line = f.readline(MAX_DOCUMENT_BYTES + 1)
    if len(line) <= MAX_DOCUMENT_BYTES:
        return line, False
    while line and not line.endswith(b"\n"):
        line = f.readline(MAX_DOCUMENT_BYTES + 1)
    return b"\n", True


def _jsonl_lines(unit: WorkUnit):
    """(line number or byte offset, raw line) of the lines that *start* inside the unit's range; a line
    over MAX_DOCUMENT_BYTES comes as (where, None)."""
    with _open(unit.path) as f:
        whole = unit.path.endswith(".gz") or unit.end < 0
        if not whole and unit.start > 0:
            f.seek(unit.start - 1)
            _line(f)  # finish the line that straddles `start`; it belongs to the previous unit
        i = 0
        while whole or (pos := f.tell()) < unit.end:
            line, too_large = _line(f)
            if not line:
                break
            i += 1
            where = f"line {i}" if whole else f"byte {pos}"
            yield where, None if too_large else line.rstrip(b"\r\n")


def read_unit(unit: WorkUnit, text_field: str = "text") -> tuple[list[str], int, list[tuple[str, str]]]:
    """Texts of one unit, bytes read, and the skips. Never raises for bad content: that is a counted skip."""
    texts: list[str] = []
    skips: list[tuple[str, str]] = []
    nbytes = 0
    try:
        if not is_jsonl(unit.path):
            raw = _read_all(unit.path)
            nbytes = len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return [], nbytes, [("non_utf8", f"{unit.path}: {e}")]
            return ([text], nbytes, []) if text else ([], nbytes, [("empty", unit.path)])
        for where, line in _jsonl_lines(unit):
            if line is None:
                skips.append(("too_large", f"{unit.path} {where}: over {MAX_DOCUMENT_BYTES} bytes"))
                continue
            nbytes += len(line) + 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                skips.append(("non_utf8", f"{unit.path} {where}: {e}"))
                continue
            except json.JSONDecodeError as e:
                skips.append(("bad_json", f"{unit.path} {where}: {e}"))
                continue
            value = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(value, str):
                skips.append(("bad_json", f"{unit.path} {where}: no string field {text_field!r}"))
            elif not value:
                skips.append(("empty", f"{unit.path} {where}"))
            else:
                texts.append(value)
    except _TooLarge as e:
        return [], nbytes, [("too_large", str(e))]
    except (OSError, EOFError, zlib.error) as e:  # missing, permission, broken symlink, bad gzip, a FIFO
        return [], nbytes, [("unreadable", f"{unit.path}: {type(e).__name__}: {e}")]
    return texts, nbytes, skips


# --- tokenizer process side (kept free of torch/webdataset imports so processes start fast) ---
_ENCODE = None
_TEXT_FIELD = "text"


def init_worker(tokenizer_json: str | None, dtype: str, text_field: str) -> None:
    """Pool initializer: rebuild the encoder once per process (byte tokenizer when `tokenizer_json` is None)."""
    global _ENCODE, _TEXT_FIELD
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from .tokenizer import ByteTokenizer, encode_ids

    if tokenizer_json is None:
        _ENCODE = ByteTokenizer().encode_batch
    else:
        from tokenizers import Tokenizer as _Tok

        tok = _Tok.from_str(tokenizer_json)
        _ENCODE = lambda texts: encode_ids(tok, texts, dtype)  # noqa: E731
    _TEXT_FIELD = text_field


def tokenize_unit(unit: WorkUnit) -> UnitResult:
    texts, nbytes, skips = read_unit(unit, _TEXT_FIELD)
    docs = _ENCODE(texts) if texts else []
    kept = []
    for text, doc in zip(texts, docs, strict=True):
        if doc.size:
            kept.append(doc)
        else:
            skips.append(("empty", f"{unit.path}: text of {len(text)} chars gave no tokens"))
    return UnitResult(unit=unit, docs=kept, nbytes=nbytes, skips=skips)


def tokenize_units(units: list[WorkUnit], workers: int, tok_json: str | None, dtype: str, text_field: str):
    """Tokenized units in input order. Uses `workers` spawned processes (safe even inside a process that
    already runs CUDA or threads); if they cannot start or die, the rest is done in-process, with a
    warning, rather than hanging."""
    done = 0
    if workers > 1:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=init_worker, initargs=(tok_json, dtype, text_field)
        )
        try:
            for res in pool.map(tokenize_unit, units, chunksize=4):
                done += 1
                yield res
            return
        except BrokenProcessPool as e:
            log.warning("tokenizer processes failed (%s); continuing in this process", e)
        finally:  # also on an early stop (strict mode): drop queued work instead of finishing it
            pool.shutdown(wait=False, cancel_futures=True)
    init_worker(tok_json, dtype, text_field)
    yield from map(tokenize_unit, units[done:])
