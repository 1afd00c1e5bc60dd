"""The manifest: what a prepared corpus holds, where its shards are, and a fingerprint that pins it.

The loader trusts nothing else: shard order, token counts (used to seek arithmetically on resume)
and checksums all come from here, and a checkpointed loader state names the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError

FORMAT = "jamba-tokens/1"
MANIFEST = "manifest.json"


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
                if sp["documents"] != sum(s.documents for s in splits[name]) or sp["tokens"] != sum(
                    s.tokens for s in splits[name]
                ):
                    raise DataError(f"{where}: split {name!r} totals do not add up over its shards")
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if man.compute_fingerprint() != man.fingerprint:
            raise DataError(
                f"{where}: fingerprint {man.fingerprint} does not match its content "
                f"({man.compute_fingerprint()}); the manifest was edited or damaged, re-run prepare"
            )
        return man


def is_local(path: str) -> bool:
    return "{name}" not in path and "://" not in path and not path.startswith("pipe:")


def location(path: str, name: str) -> str:
    """Where file `name` of a corpus lives: a local path, `<url>/<name>`, or the `{name}` template filled."""
    if "{name}" in path:
        return path.replace("{name}", name)
    if is_local(path):
        return os.path.join(path, name)
    return path.rstrip("/") + "/" + name


def read_bytes(url: str) -> bytes:
    """Whole file from a local path or any URL/pipe webdataset's gopen supports; errors name the URL."""
    if is_local(url) or url.startswith("file:"):
        with open(url.removeprefix("file://").removeprefix("file:"), "rb") as f:
            return f.read()
    from webdataset.gopen import gopen  # imports torch: keep it off the prepare workers' path

    try:
        stream = gopen(url, "rb")
        try:
            return stream.read()
        finally:
            stream.close()  # a pipe's exit status is checked here
    except Exception as e:  # noqa: BLE001 - gopen raises many types; all mean "could not read"
        raise DataError(f"could not read {url}: {type(e).__name__}: {e}") from None


def load_manifest(path: str) -> Manifest:
    url = location(path, MANIFEST)
    try:
        raw = read_bytes(url)
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


def check_local_shards(path: str, shards: list[ShardInfo]) -> None:
    """Cheap stat of every shard of a local corpus, so a missing or truncated file fails at start-up."""
    if not is_local(path):
        return
    for s in shards:
        p = os.path.join(path, s.name)
        try:
            size = os.path.getsize(p)
        except OSError:
            raise DataError(
                f"shard {p} listed in the manifest is missing or unreadable; "
                f"the manifest does not match the shards (re-run prepare)"
            ) from None
        if size != s.bytes:
            raise DataError(
                f"shard {p} has {size} bytes but the manifest says {s.bytes}: "
                f"it is truncated or was replaced (re-run prepare)"
            )
