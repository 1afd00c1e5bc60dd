"""A progress line for work longer than a few seconds (evaluation, a report's probes, recall).

`with progress("evaluating", total=40) as tick: ... tick()` logs "evaluating: 12/40 (30%), 6 s" at most every
EVERY_S seconds and one closing line when the work took that long; short work prints nothing. Lines go
through `logging` (rank 0 only under the trainer's logging config), never as a bar that warnings interleave.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

EVERY_S = 5.0
_log = logging.getLogger("train.progress")


@contextlib.contextmanager
def progress(
    what: str, total: int | None = None, every_s: float = EVERY_S, logger: logging.Logger | None = None
) -> Iterator[Callable[[int], None]]:
    out = logger or _log
    start = last = time.monotonic()
    done, shown = 0, 0

    def line(now: float, end: str = "") -> str:
        count = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done} done"
        return f"{what}: {count}, {now - start:.0f} s{end}"

    def tick(n: int = 1) -> None:
        nonlocal done, last, shown
        done += n
        now = time.monotonic()
        if now - last >= every_s:
            out.info("%s", line(now))
            last, shown = now, done

    yield tick
    now = time.monotonic()
    if now - start >= every_s and shown != done:  # the closing count, unless the last line gave it
        out.info("%s", line(now, ", done"))
