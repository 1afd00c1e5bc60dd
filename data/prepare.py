"""`python -m data.prepare`: text files -> tokenized webdataset shards + manifest (train and val splits).

With no inputs it prepares the built-in corpus (this interpreter's standard-library sources) into
data_cache/stdlib with the byte tokenizer, so training needs no download. `--synthetic mqar` generates
a recall corpus instead (data/synthetic.py; `python -m data.prepare --synthetic mqar --help`).
Output appears atomically: everything is written to `<output>.partial-<pid>` and renamed once the
manifest is complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .errors import DataError
from .manifest import MANIFEST, Manifest, load_manifest, write_manifest
from .prepare_plan import (
    DEFAULT_SHARD_MB,
    FIT_SHARDS,
    MIN_SHARDS,
    ValSplit,
    check_existing,
    fitted_shard_bytes,
    options,
    pieces,
)
from .shards import ShardWriter
from .sources import (
    DEFAULT_EXTS,
    SKIP_REASONS,
    builtin_corpus_files,
    discover,
    plan_units,
    read_unit,
    tokenize_units,
)
from .tokenizer import ByteTokenizer, HFTokenizer, token_dtype, train_bpe

log = logging.getLogger("data.prepare")
BUILTIN_PATH = "data_cache/stdlib"
BUILTIN_SHARD_MB = 2.0  # ~30 shards, so up to ~30 (rank, worker) slots can share the small built-in corpus
FEW_SHARDS = 16
MAX_EXAMPLES = 100
SKIP_TEXT = {
    "unreadable": "unreadable",
    "non_utf8": "not UTF-8",
    "bad_json": "bad JSON lines",
    "empty": "empty",
    "too_large": "over 256 MB",
}


def _make_tokenizer(
    spec: str, files: list[str], vocab_size: int, text_field: str, bpe_sample_mb: float, specials: dict
):
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        limit = int(bpe_sample_mb * (1 << 20))

        def texts():
            seen = 0
            for unit in plan_units(files):
                for t in read_unit(unit, text_field)[0]:
                    yield t
                    seen += len(t)
                if seen >= limit:
                    return

        log.info("training a byte-level BPE with vocab %d on up to %.0f MB", vocab_size, bpe_sample_mb)
        return train_bpe(texts(), vocab_size)
    return HFTokenizer.from_file(spec, **specials)


def prepare(
    inputs: list[str] | None = None,
    output: str | None = None,
    tokenizer: str = "byte",
    vocab_size: int = 8192,
    text_field: str = "text",
    exts: tuple[str, ...] = DEFAULT_EXTS,
    shard_size_mb: float | None = None,
    val_fraction: float = 0.01,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    max_files: int | None = None,
    bpe_sample_mb: float = 100.0,
    progress: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> dict:
    """Tokenize `inputs` (files, directories, globs; none = the built-in corpus) into `output`.

    Returns the manifest as a dict. Bad inputs are skipped, counted by reason, logged and listed in the
    manifest; `strict=True` turns any such skip (other than an empty document) into a DataError.
    """
    builtin = not inputs
    output = output or (BUILTIN_PATH if builtin else None)
    if output is None:
        raise ValueError("--output is required when inputs are given")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    specials = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
    asked = options(
        inputs, tokenizer, vocab_size, text_field, exts, shard_size_mb, val_fraction, max_files, specials
    )
    if not overwrite and check_existing(output, asked):
        log.info("%s already holds this corpus (same options); --overwrite rebuilds it", output)
        return load_manifest(output).to_dict()
    t0 = time.perf_counter()
    ignored: Counter = Counter()
    files = builtin_corpus_files() if builtin else discover(list(inputs), exts, ignored)
    files = files[:max_files] if max_files else files
    units = plan_units(files)
    tok = _make_tokenizer(tokenizer, files, vocab_size, text_field, bpe_sample_mb, specials)
    dtype = token_dtype(tok.vocab_size)
    tmp = Path(f"{output.rstrip('/')}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_json = None if isinstance(tok, ByteTokenizer) else tok.to_str()
    if tok_json is not None:
        (tmp / "tokenizer.json").write_text(tok_json)
    total = sum(max(u.end - u.start, 0) if u.end >= 0 else _size(u.path) for u in units)
    small, estimated_tokens = False, 0.0
    if shard_size_mb or builtin:
        target = int((shard_size_mb or BUILTIN_SHARD_MB) * (1 << 20))
    else:
        target, small, estimated_tokens = fitted_shard_bytes(tok, units, text_field, total)
        log.info(
            "shard size %.3g MB, fitted to %.3g MB of input%s",
            target / (1 << 20),
            total / 1e6,
            " (a small input: documents are cut into shard-sized pieces)" if small else "",
        )
    piece_tokens = max(1, target // np.dtype(dtype).itemsize) if small else 0
    split_of = ValSplit(val_fraction, small, estimated_tokens)
    writers = {
        "train": ShardWriter(tmp, "train", target, dtype),
        "val": ShardWriter(tmp, "val", target, dtype),
    }
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
    n_docs = n_bytes = 0
    if workers is None:  # byte "tokenizing" is a copy: process IPC would cost more than it saves
        workers = 1 if isinstance(tok, ByteTokenizer) else os.cpu_count() or 1
    results = tokenize_units(units, min(workers, len(units)), tok_json, dtype, text_field)
    try:
        # warnings print above the bar, not through it
        with (
            logging_redirect_tqdm(loggers=[logging.getLogger()]),
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"prepare {Path(output).name}",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for res in results:
                for reason, detail in res.skips:
                    if strict and reason != "empty":
                        raise DataError(f"{reason}: {detail} (strict mode; drop --strict to skip and count)")
                    counts[reason] += 1
                    if len(examples[reason]) < MAX_EXAMPLES:
                        examples[reason].append(detail)
                    if reason != "empty" and counts[reason] <= 20:
                        log.warning("skipped (%s) %s", reason, detail)
                for doc in res.docs:
                    for piece in pieces(doc, piece_tokens) if small else [doc]:
                        writers[split_of(int(piece.size))].add(piece)
                    n_docs += 1
                n_bytes += res.nbytes
                u = res.unit
                bar.update(u.end - u.start if u.end >= 0 else _size(u.path))
        splits = {name: w.close() for name, w in writers.items()}
        if not splits["train"]:
            raise DataError(
                f"no documents to train on: {len(files)} input files gave {n_docs} documents "
                f"(skipped: {dict(counts) or 'none'}); check the inputs and --text-field"
            )
        if len(splits["train"]) < (MIN_SHARDS if small else FEW_SHARDS) and not builtin:
            log.warning(
                "only %d train shards: at most %d (rank, worker) slots can read this corpus; "
                "a smaller --shard-size-mb (now %.3g) makes more",
                len(splits["train"]),
                len(splits["train"]),
                target / (1 << 20),
            )
        if val_fraction > 0 and not splits["val"]:
            log.warning(
                "val split is empty: %d documents are too few for val_fraction=%g", n_docs, val_fraction
            )
        man = Manifest(
            tokenizer=tok.describe(),
            dtype=dtype,
            splits=splits,
            source={
                "inputs": list(inputs or []),
                "builtin_stdlib": builtin,
                "files": len(files),
                "bytes": n_bytes,
                "text_field": text_field,
                "val_fraction": val_fraction,
                "shard_bytes": target,
                "small_input_pieces": piece_tokens,  # 0: documents whole
                "options": asked,
                "not_searched": dict(ignored),  # files of other types in the input folders, by extension
            },
            skipped={r: {"count": counts[r], "examples": examples[r]} for r in SKIP_REASONS},
        )
        manifest = write_manifest(tmp, man)
        _publish(tmp, Path(output), overwrite)
    finally:
        results.close()  # stops the tokenizer processes early on an error
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.perf_counter() - t0
    if ignored:
        log.info(
            "skipped %d files in the input folders: %s (not searched; --ext adds an extension)",
            sum(ignored.values()),
            ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in ignored.most_common()),
        )
    if skipped := {r: counts[r] for r in SKIP_REASONS if counts[r]}:
        level = logging.WARNING if set(skipped) - {"empty"} else logging.INFO  # empty files are ordinary
        log.log(
            level,
            "skipped %d inputs: %s (listed in %s)",
            sum(skipped.values()),
            ", ".join(f"{n} {SKIP_TEXT.get(r, r)}" for r, n in skipped.items()),
            Path(output) / MANIFEST,
        )
    log.info(
        "prepared %s: %d documents, %d tokens, %d train + %d val shards, %.1f MB in %.1f s (%.1f MB/s)",
        output,
        n_docs,
        sum(s.tokens for v in splits.values() for s in v),
        len(splits["train"]),
        len(splits["val"]),
        n_bytes / 1e6,
        dt,
        n_bytes / 1e6 / max(dt, 1e-9),
    )
    return manifest


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished directory into place; losing a race to another process is fine."""
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(x == "--synthetic" or x.startswith("--synthetic=") for x in argv):
        from .synthetic import main as synthetic_main  # a generated corpus: its own options

        return synthetic_main(argv)
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help="files, directories or globs (default: the stdlib corpus)")
    p.add_argument("-o", "--output", help=f"output directory (default for the stdlib corpus: {BUILTIN_PATH})")
    p.add_argument("--tokenizer", default="byte", help="byte | bpe | path/to/tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab size when training a BPE")
    p.add_argument("--bpe-sample-mb", type=float, default=100.0, help="text used to train the BPE")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    p.add_argument(
        "--ext", action="append", help=f"extension searched in directories (default {DEFAULT_EXTS})"
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        help=f"target shard size (default: fitted to give ~{FIT_SHARDS} train shards, 64 KB to "
        f"{DEFAULT_SHARD_MB:g} MB; {BUILTIN_SHARD_MB:g} for the stdlib corpus)",
    )
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: CPU count; 1 for byte)")
    p.add_argument("--max-files", type=int, help="use only the first N input files (smoke tests)")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable/non-UTF-8/bad-JSON input")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (needed when the options differ)"
    )
    for name in ("bos", "eos", "pad"):
        p.add_argument(f"--{name}-token", help=f"{name.upper()} token of a tokenizer.json (auto-detected)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--synthetic", choices=["mqar"], help="generate a corpus instead (see --synthetic mqar --help)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(
            a.inputs,
            a.output,
            tokenizer=a.tokenizer,
            vocab_size=a.vocab_size,
            text_field=a.text_field,
            exts=tuple(a.ext) if a.ext else DEFAULT_EXTS,
            shard_size_mb=a.shard_size_mb,
            val_fraction=a.val_fraction,
            workers=a.workers,
            strict=a.strict,
            overwrite=a.overwrite,
            max_files=a.max_files,
            bpe_sample_mb=a.bpe_sample_mb,
            progress=not a.quiet,
            bos_token=a.bos_token,
            eos_token=a.eos_token,
            pad_token=a.pad_token,
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
