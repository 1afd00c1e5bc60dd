"""Data pipeline benchmark: `prepare` MB/s on the built-in corpus and loader tokens/s per worker count.

    python benchmarks/bench_data.py [--seq-len 4096] [--workers 1 4] [--seconds 5]

Loader rows read with shuffling on (the default: shuffled shards, documents and windows), from the built-in
corpus alone and from a 3-corpus mixture (stdlib 0.5, short documents 0.25, medium documents 0.25).
The loader must never starve a GPU: the target is >= 1M tokens/s with 4 workers at seq_len 4096.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data import DataConfig, TokenLoader, ensure_builtin_corpus  # noqa: E402
from data.mixture import MixtureEntry  # noqa: E402
from data.prepare import prepare  # noqa: E402

TARGET_TOKENS_PER_S = 1_000_000


def bench_prepare(workers: int, tokenizer: str = "byte") -> tuple[float, float]:
    """(MB/s of source text, seconds) for preparing the built-in corpus from scratch, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        man = prepare(None, os.path.join(tmp, "stdlib"), tokenizer=tokenizer, workers=workers, progress=False)
        dt = time.perf_counter() - t0
    return man["source"]["bytes"] / 1e6 / dt, dt


def bench_cli(*args: str) -> tuple[float, float]:
    """(MB/s of source text, wall seconds) of a cold `python -m data.prepare` on the built-in corpus."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stdlib")
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "data.prepare", "-o", out, "--quiet", *args],
            cwd=root,
            check=True,
            capture_output=True,
        )
        dt = time.perf_counter() - t0
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f)["source"]["bytes"] / 1e6 / dt, dt


def short_doc_corpus(tmp: str, n_docs: int = 60_000) -> str:
    """Worst case for per-document overhead: ~110-token documents (JSON lines), 16 MB shards."""
    rng = random.Random(0)
    src = os.path.join(tmp, "short.jsonl")
    with open(src, "w") as f:
        for _ in range(n_docs):
            f.write(
                json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(20, 200)))})
            )
            f.write("\n")
    out = os.path.join(tmp, "short")
    prepare([src], out, workers=1, progress=False, shard_size_mb=16, val_fraction=0)
    return out


def medium_doc_corpus(tmp: str, n_docs: int = 6000) -> str:
    """~4 KB documents of random words (JSON lines), shard size fitted by prepare (~32 shards)."""
    rng = np.random.default_rng(0)
    words = np.array(
        ["".join(rng.choice(list("abcdefghijklmnop"), size=n)) for n in rng.integers(2, 10, 512)]
    )
    src = os.path.join(tmp, "medium.jsonl")
    with open(src, "w") as f:
        for n in rng.integers(300, 1100, n_docs):
            f.write(json.dumps({"text": " ".join(words[rng.integers(0, 512, n)])}) + "\n")
    out = os.path.join(tmp, "medium")
    prepare([src], out, workers=1, progress=False, val_fraction=0)
    return out


def bench_loader(
    path: str | list[tuple[str, float]], workers: int, seq_len: int, batch: int, seconds: float
) -> tuple[float, float]:
    """(tokens/s in steady state, seconds to the first batch) for one rank reading the train split of a
    corpus, or of a mixture given as [(path, weight), ...]."""
    mixture = [MixtureEntry(p, w) for p, w in path] if isinstance(path, list) else []
    loader = TokenLoader(
        DataConfig(
            path=path if isinstance(path, str) else "",
            mixture=mixture,
            seq_len=seq_len,
            micro_batch_size=batch,
            num_workers=workers,
        )
    )
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    tokens, t1 = 0, time.perf_counter()
    for x, _ in itertools.islice(it, 10**9):
        tokens += x.numel()
        if time.perf_counter() - t1 >= seconds:
            break
    rate = tokens / (time.perf_counter() - t1)
    it.close()
    return rate, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="data_cache/stdlib", help="prepared corpus (made if missing)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 4])
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per loader configuration")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--bpe", action="store_true", help="also time the CLI training an 8192-token BPE (~1 min)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("data.prepare").setLevel(logging.ERROR)  # the stdlib's 4 non-UTF-8 files
    import warnings

    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 4 workers on 2 cores
    rows = []
    if not a.skip_prepare:
        import webdataset  # noqa: F401 - imports torch; keep that one-off cost out of the MB/s

        mbs, dt = bench_prepare(1)
        rows.append(("prepare() stdlib, byte, in-process, warm imports", f"{mbs:.1f} MB/s", f"{dt:.1f} s"))
        cpus = str(os.cpu_count() or 1)
        runs = [("byte", "1"), ("byte", cpus)] + ([("bpe", cpus)] if a.bpe else [])
        for tok, workers in runs:
            mbs, dt = bench_cli("--tokenizer", tok, "--workers", workers)
            rows.append(
                (
                    f"python -m data.prepare --tokenizer {tok} --workers {workers}",
                    f"{mbs:.1f} MB/s",
                    f"{dt:.1f} s wall, cold",
                )
            )
    path = ensure_builtin_corpus(a.path)
    with tempfile.TemporaryDirectory() as tmp:
        short, medium = short_doc_corpus(tmp), medium_doc_corpus(tmp)
        mixture = [(path, 0.5), (short, 0.25), (medium, 0.25)]
        for what, source in (("stdlib", path), ("3-corpus mixture", mixture)):
            for workers in a.workers:
                rate, first = bench_loader(source, workers, a.seq_len, a.micro_batch_size, a.seconds)
                target = workers == 4 and rate >= TARGET_TOKENS_PER_S
                verdict = "" if workers != 4 else (" (>= 1M: ok)" if target else " (< 1M: TOO SLOW)")
                rows.append(
                    (
                        f"loader {what}, shuffled, seq_len={a.seq_len} batch={a.micro_batch_size} "
                        f"num_workers={workers}",
                        f"{rate / 1e6:.2f}M tokens/s{verdict}",
                        f"first batch {first:.2f} s",
                    )
                )
        rate, first = bench_loader(short, 4, a.seq_len, a.micro_batch_size, a.seconds)
        rows.append(
            (
                "loader, 60k short docs (~110 tokens), num_workers=4",
                f"{rate / 1e6:.2f}M tokens/s",
                f"first batch {first:.2f} s",
            )
        )
    print(f"\nmachine: {os.cpu_count()} CPU cores, python {sys.version.split()[0]}\n")
    w = max(len(r[0]) for r in rows)
    print(f"| {'what':<{w}} | {'throughput':<28} | {'notes':<20} |")
    print(f"|{'-' * (w + 2)}|{'-' * 30}|{'-' * 22}|")
    for r in rows:
        print(f"| {r[0]:<{w}} | {r[1]:<28} | {r[2]:<20} |")


if __name__ == "__main__":
    main()
