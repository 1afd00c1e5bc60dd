"""What `data.prepare` decides before it reads a document: the options a corpus is prepared with (kept in its
manifest, so a second prepare with other options is an error, not a silent no-op), and the shard size fitted
to the input, small corpora included.

A small input (under SMALL_INPUT_BYTES of tokens) gets shards of a few KB and its documents cut into
shard-sized pieces, so that even a 28 KB corpus of 5 files fills MIN_SHARDS train shards (2 ranks x 4 workers)
and a val split of at least one piece.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataError
from .manifest import MANIFEST, load_manifest
from .sources import read_unit
from .tokenizer import ByteTokenizer, token_dtype

DEFAULT_SHARD_MB = 64.0  # the largest fitted shard size: inputs over ~1-2 GB get shards of this size
FIT_SHARDS = 32  # the fitted size aims at this many train shards, so >= 16 even when the estimate is off
MIN_FIT_SHARD_BYTES = 64 << 10  # the smallest fitted shard of an ordinary input
MIN_SHARDS = 8  # (rank, worker) slots a small corpus must serve: 2 ranks x 4 workers
SMALL_INPUT_BYTES = (
    16 * MIN_FIT_SHARD_BYTES
)  # below (< 16 shards of 64 KB): shards of a few KB, documents cut
MIN_SMALL_SHARD_BYTES = 512  # 256 uint16 tokens: still whole sequences of the default 128-256
SAMPLE_BYTES = 1 << 20
SMALL_VAL_SHARE, SMALL_VAL_TOKENS = 0.1, 4096
SMALL_VAL_BATCHES = (
    2100  # tokens: a val micro-batch per rank for 2 ranks x 4 x 256 (up to a quarter of the corpus)
)
# Settings that decide a prepared corpus; a manifest records them under source.options.
OPTION_FLAGS = {
    "inputs": "inputs",
    "tokenizer": "--tokenizer",
    "vocab_size": "--vocab-size",
    "text_field": "--text-field",
    "exts": "--ext",
    "shard_size_mb": "--shard-size-mb",
    "val_fraction": "--val-fraction",
    "max_files": "--max-files",
    "bos_token": "--bos-token",
    "eos_token": "--eos-token",
    "pad_token": "--pad-token",
}


def options(
    inputs: list[str] | None,
    tokenizer: str,
    vocab_size: int,
    text_field: str,
    exts: tuple[str, ...],
    shard_size_mb: float | None,
    val_fraction: float,
    max_files: int | None,
    specials: dict,
) -> dict:
    """The options that decide the corpus, as the manifest records them (paths made absolute)."""

    def norm(p: str) -> str:
        return os.path.abspath(p) if os.path.exists(p) else p

    spec = tokenizer if tokenizer in ("byte", "bpe") else norm(tokenizer)
    return {
        "inputs": sorted(norm(p) for p in inputs or []),
        "tokenizer": spec,
        "vocab_size": vocab_size if spec == "bpe" else None,  # read only when a BPE is trained
        "text_field": text_field,
        "exts": sorted(exts),
        "shard_size_mb": shard_size_mb,
        "val_fraction": val_fraction,
        "max_files": max_files,
        **{f"{k}_token": v for k, v in specials.items()},
    }


def check_existing(output: str, asked: dict) -> bool:
    """True when `output` already holds this corpus (prepared with `asked`); a corpus prepared with other
    options is a DataError naming each of them; a folder without a manifest is one too."""
    if not os.path.exists(os.path.join(output, MANIFEST)):
        if os.path.exists(output):
            raise DataError(
                f"{output} exists but holds no {MANIFEST} (an interrupted run?); pass --overwrite or remove it"
            )
        return False
    source = load_manifest(output).source
    recorded = source.get("options")
    if recorded is None:  # a corpus from before options were recorded: what its manifest says
        recorded = {"val_fraction": source.get("val_fraction"), "text_field": source.get("text_field")}
        recorded = {k: v for k, v in recorded.items() if v is not None}
    diff = [
        f"{OPTION_FLAGS.get(k, k)} {_show(recorded[k])} (asked: {_show(asked.get(k))})"
        for k in recorded
        if k in asked and recorded[k] != asked[k]
    ]
    if diff:
        raise DataError(
            f"{output} holds a corpus prepared with other options: {'; '.join(diff)}. Pass --overwrite to "
            f"replace it, or choose another --output"
        )
    return True


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "none"
    return "unset" if v is None else str(v)


def fitted_shard_bytes(tok, units: list, text_field: str, total_bytes: int) -> tuple[int, bool, float]:
    """(shard size, small, estimated tokens): a size that cuts the input into ~FIT_SHARDS train shards, up to DEFAULT_SHARD_MB;
    `small` when the input is under SMALL_INPUT_BYTES, whose documents are then cut into shard-sized pieces.

    Output bytes are estimated from the input size and the tokens per input byte of a ~1 MB sample
    (exact for the byte tokenizer: one token per UTF-8 byte); `.gz` inputs count by their compressed size.
    """
    itemsize = np.dtype(token_dtype(tok.vocab_size)).itemsize
    cap = int(DEFAULT_SHARD_MB * (1 << 20))
    tokens_per_byte = 1.0
    if not isinstance(tok, ByteTokenizer) and total_bytes * itemsize // FIT_SHARDS < cap:
        texts, seen = [], 0
        for unit in units:
            for t in read_unit(unit, text_field)[0]:
                texts.append(t)
                seen += len(t.encode("utf-8"))
            if seen >= SAMPLE_BYTES:
                break
        if seen:
            tokens_per_byte = sum(int(a.size) for a in tok.encode_batch(texts)) / seen
    tokens = total_bytes * tokens_per_byte
    estimate = tokens * itemsize
    if estimate < SMALL_INPUT_BYTES:
        return int(max(MIN_SMALL_SHARD_BYTES, estimate / FIT_SHARDS)), True, tokens
    return int(min(cap, max(MIN_FIT_SHARD_BYTES, estimate / FIT_SHARDS))), False, tokens


def pieces(doc: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """A small corpus's document cut into pieces of at most `max_tokens` (the last one may be shorter)."""
    if doc.size <= max_tokens:
        return [doc]
    return [doc[s : s + max_tokens] for s in range(0, doc.size, max_tokens)]


class ValSplit:
    """Which split each document goes to. Every 1/fraction-th document goes to val: exact, spread evenly,
    stable for a fixed input. A small corpus's first pieces go to val until it holds SMALL_VAL_SHARE of the
    tokens, or SMALL_VAL_BATCHES tokens if that is more (up to a quarter of the corpus), at most
    SMALL_VAL_TOKENS: a val split of at least one piece, with a micro-batch per rank at the defaults."""

    def __init__(self, fraction: float, small: bool, estimated_tokens: float) -> None:
        self.fraction, self.index, self.val_tokens = fraction, 0, 0
        want = max(SMALL_VAL_SHARE * estimated_tokens, min(SMALL_VAL_BATCHES, 0.25 * estimated_tokens))
        self.small_target = min(SMALL_VAL_TOKENS, want) if small else 0

    def __call__(self, tokens: int) -> str:
        i, self.index = self.index, self.index + 1
        if self.fraction > 0 and self.val_tokens < self.small_target:
            self.val_tokens += tokens
            return "val"
        return "val" if int((i + 1) * self.fraction) > int(i * self.fraction) else "train"
