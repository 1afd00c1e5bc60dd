"""The manifest: what a prepared corpus holds, where its shards are, and a fingerprint that pins it.

The loader trusts nothing else: shard order, token counts (used to seek arithmetically on resume)
and checksums all come from here, and a checkpointed loader state names the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError

log = logging.getLogger("data.manifest")

FORMAT = "jamba-tokens/1"
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 256 << 20  # ~1M shard entries; a larger "manifest" is not one
# A shard is one plain file name: no directories, no `..`, nothing a shell or a command's option parser
# reads as syntax (it starts with a letter or digit), so it can be put into a `pipe:` command safely.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ShardInfo:
    """One webdataset tar: one sample per document, member `<key>.tokens.npy`."""

    name: str
    documents: int
    tokens: int  # document tokens, without the EOS separators the loader inserts
    bytes: int
    sha256: str

    @property
    def stream_tokens(self) -> int:
        """Tokens this shard contributes to a packed stream: each document plus its EOS."""
        return self.tokens + self.documents


@dataclass
class Manifest:
    tokenizer: dict
    dtype: str
    splits: dict[str, list[ShardInfo]]
    source: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise DataError(f"manifest has no split {split!r} (it has {sorted(self.splits)})")
        return self.splits[split]

    def compute_fingerprint(self) -> str:
        """Hash of everything that decides the token stream (not of provenance such as skip lists)."""
        core = {
            "format": FORMAT,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "splits": {k: [asdict(s) for s in v] for k, v in sorted(self.splits.items())},
        }
        blob = json.dumps(core, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        splits = {}
        for name, shards in self.splits.items():
            splits[name] = {
                "documents": sum(s.documents for s in shards),
                "tokens": sum(s.tokens for s in shards),
                "shards": [asdict(s) for s in shards],
            }
        return {
            "format": FORMAT,
            "fingerprint": self.compute_fingerprint(),
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "splits": splits,
            "source": self.source,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT:
            raise DataError(
                f"{where}: format {d.get('format')!r} is not {FORMAT!r}; re-run python -m data.prepare"
            )
        try:
            splits = {name: [ShardInfo(**s) for s in sp["shards"]] for name, sp in d["splits"].items()}
            man = cls(
                tokenizer=d["tokenizer"],
                dtype=d["dtype"],
                splits=splits,
                source=d.get("source", {}),
                skipped=d.get("skipped", {}),
                fingerprint=d["fingerprint"],
            )
            for name, sp in d["splits"].items():
                for shard in splits[name]:
                    _check_shard(shard, where)
                if sp["documents"] != sum(s.documents for s in splits[name]) or sp["tokens"] != sum(
                    s.tokens for s in splits[name]
                ):
                    raise DataError(f"{where}: split {name!r} totals do not add up over its shards")
            tok_file = man.tokenizer.get("file")
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if tok_file is not None and not (isinstance(tok_file, str) and FILE_NAME.fullmatch(tok_file)):
            raise DataError(f"{where}: tokenizer file {tok_file!r} is not a plain file name in the corpus")
        if man.compute_fingerprint() != man.fingerprint:  # the computed value is not shown: it is no secret,
            raise DataError(  # but an error should not hand out what to write into an edited manifest
                f"{where}: fingerprint {man.fingerprint} does not match its content; "
                f"the manifest was edited or damaged, re-run prepare"
            )
        return man


def _check_shard(s: ShardInfo, where: str) -> None:
    """A shard entry the loader can use safely: a plain name, counts that are integers, documents in it."""
    if not (isinstance(s.name, str) and SHARD_NAME.fullmatch(s.name)):
        raise DataError(
            f"{where}: shard name {s.name!r} is not a plain file name ending in .tar "
            f"(letters, digits, '._-', starting with a letter or digit)"
        )
    for key in ("documents", "tokens", "bytes"):
        v = getattr(s, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise DataError(f"{where}: shard {s.name}: {key} {v!r} is not a count")
    if s.documents < 1 or s.tokens < 1:
        raise DataError(
            f"{where}: shard {s.name} holds {s.documents} documents / {s.tokens} tokens; a shard without "
            f"tokens cannot be streamed (re-run prepare)"
        )
    if not (isinstance(s.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", s.sha256)):
        raise DataError(f"{where}: shard {s.name}: sha256 {str(s.sha256)[:80]!r} is not a SHA-256 digest")


def is_local(path: str) -> bool:
    return "{name}" not in path and "://" not in path and not path.startswith("pipe:")


def location(path: str, name: str) -> str:
    """Where file `name` of a corpus lives: a local path, `<url>/<name>`, or the `{name}` template filled.

    A `pipe:` template is a shell command from the user's own config (code, never data): the name is
    shell-quoted into it (a no-op for the plain names a manifest may hold, a guard for anything else)."""
    if "{name}" in path:
        return path.replace("{name}", shlex.quote(name) if path.startswith("pipe:") else name)
    if is_local(path):
        return os.path.join(path, name)
    return path.rstrip("/") + "/" + name


def read_bytes(url: str, limit: int) -> bytes:
    """At most `limit` bytes of a file: a local path (a regular file only, so a FIFO or a device cannot
    hang or flood the reader), or any URL/pipe webdataset's gopen supports. More than `limit` bytes is a
    DataError; errors name the URL."""
    if is_local(url) or url.startswith("file:"):
        path = url.removeprefix("file://").removeprefix("file:")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{path} is not a regular file (a FIFO, device or directory); not reading it")
            raw = f.read(limit + 1)
    else:
        raw = _read_url(url, limit)
    if len(raw) > limit:
        raise DataError(f"{url} holds more than the {limit} bytes expected of it; not reading on")
    return raw


def _read_url(url: str, limit: int) -> bytes:
    from webdataset.gopen import gopen  # imports torch: keep it off the prepare workers' path

    try:
        stream = gopen(url, "rb")
        try:
            raw = stream.read(limit + 1)
        except BaseException:
            _close_quietly(stream)
            raise
        if len(raw) > limit:
            _close_quietly(stream)  # a command still writing gets SIGPIPE; its status means nothing now
        else:
            stream.close()  # a pipe's exit status is checked here
    except Exception as e:  # noqa: BLE001 - gopen raises many types; all mean "could not read"
        raise DataError(f"could not read {url}: {type(e).__name__}: {e}") from None
    return raw


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001, S110 - already failing or over the limit: the first error is the one
        pass


def load_manifest(path: str) -> Manifest:
    url = location(path, MANIFEST)
    try:
        raw = read_bytes(url, MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        raise DataError(
            f"no {MANIFEST} at {url}: prepare the corpus first "
            f"(python -m data.prepare, or data.ensure_builtin_corpus)"
        ) from None
    except OSError as e:
        raise DataError(f"could not read {url}: {e}") from None
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{url} is not valid JSON ({e}); re-run python -m data.prepare") from None
    return Manifest.from_dict(d, where=url)


def write_manifest(out_dir: str | Path, man: Manifest) -> dict:
    d = man.to_dict()
    man.fingerprint = d["fingerprint"]
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    os.replace(tmp, Path(out_dir) / MANIFEST)
    return d


def publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename a finished corpus directory (written under a temporary name) into place; losing a race to another process is fine."""
    output.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if output.exists() and overwrite:
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.rename(output, old)
    try:
        os.rename(tmp, output)
    except OSError:
        if not (output / MANIFEST).exists():
            raise
        log.info("%s was prepared concurrently by another process; keeping that one", output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_local_shards(path: str, shards: list[ShardInfo]) -> None:
    """Cheap stat of every shard of a local corpus, so a missing or truncated file fails at start-up."""
    if not is_local(path):
        return
    for s in shards:
        p = os.path.join(path, s.name)
        try:
            st = os.stat(p)
        except OSError:
            raise DataError(
                f"shard {p} listed in the manifest is missing or unreadable; "
                f"the manifest does not match the shards (re-run prepare)"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"shard {p} is not a regular file (a FIFO, device or directory)")
        size = st.st_size
        if size != s.bytes:
            raise DataError(
                f"shard {p} has {size} bytes but the manifest says {s.bytes}: "
                f"it is truncated or was replaced (re-run prepare)"
            )
