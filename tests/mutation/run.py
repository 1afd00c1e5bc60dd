"""Mutation check of the test suite: plant one bug at a time in a scratch copy of the repository, run only
the tests that should catch it, and print a table. The bugs and their tests: tests/mutation/bugs.py. Not
collected by pytest (no test_*.py), not part of CI.

    python tests/mutation/run.py                 # every bug (several minutes on 2 cores)
    python tests/mutation/run.py --only z_loss_square,rollback_no_reload
    python tests/mutation/run.py --list          # the bugs and their tests, nothing run
    python tests/mutation/run.py --baseline      # also run each selection unmutated first (must pass)

The copy holds the working tree as git sees it (tracked and untracked, not ignored files), plus a link to
data_cache/ (the built-in corpus). A bug is a literal replacement that must match exactly once; it is
caught when pytest reports failing tests (exit code 1). Exit status: 0 iff every bug was caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bugs import BUGS  # beside this script (python tests/mutation/run.py)

ROOT = Path(__file__).resolve().parents[2]


def copy_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / os.fsdecode(f)
        if src.is_file():
            (dst / src.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / src.relative_to(ROOT))
    if (ROOT / "data_cache").is_dir():
        (dst / "data_cache").symlink_to(ROOT / "data_cache")


def pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return p.returncode, p.stdout[-3000:] + p.stderr[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated bug names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="run each selection unmutated first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of missed bugs")
    a = ap.parse_args()
    bugs = BUGS
    if a.only:
        names = a.only.split(",")
        if unknown := sorted(set(names) - {b.name for b in BUGS}):
            ap.error(f"unknown bugs {unknown}; --list shows them")
        bugs = [b for b in BUGS if b.name in names]
    if a.list:
        for b in bugs:
            print(f"{b.name}: {b.what} ({b.path}) -> {', '.join(b.tests)}")
        return 0
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="jamba-mutation-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        for b in bugs:
            target = copy / b.path
            original = target.read_text()
            n = original.count(b.old)
            short = ", ".join(t.split("::")[-1] or t for t in b.tests)
            if n != 1:
                rows.append((b.what, short, f"NOT PLANTED ({n} matches of the old text)", 0.0))
                ok = False
                continue
            t0 = time.monotonic()
            if a.baseline:
                rc, out = pytest(copy, b.tests, a.timeout)
                if rc != 0:
                    rows.append((b.what, short, f"BASELINE FAILS (pytest exit {rc})", time.monotonic() - t0))
                    print(out, file=sys.stderr)
                    ok = False
                    continue
            target.write_text(original.replace(b.old, b.new))
            try:
                rc, out = pytest(copy, b.tests, a.timeout)
            finally:
                target.write_text(original)
            result = {0: "**missed**", 1: "caught"}.get(rc, f"ERROR (pytest exit {rc})")
            ok &= rc == 1
            if rc != 1 and a.verbose:
                print(out, file=sys.stderr)
            rows.append((b.what, short, result, time.monotonic() - t0))
            print(f"{b.name}: {result} ({rows[-1][3]:.0f} s)", file=sys.stderr, flush=True)
    table = ["| planted bug | tests run | result | seconds |", "| --- | --- | --- | ---: |"]
    table += [f"| {w} | {t} | {r} | {s:.0f} |" for w, t, r, s in rows]
    caught = sum(r == "caught" for _, _, r, _ in rows)
    table.append(f"\n{caught} of {len(rows)} planted bugs caught.")
    text = "\n".join(table)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
