"""How a job ended, for the launcher that started it: one line and an exit status.

A launcher cannot tell a handled stop from a failure (torchrun exits 1 after passing on a SIGTERM, even
when every rank saved and exited 0), nor which of many ranks' lines is the cause. So the launchers we
document (`make train`, `launch.run`, the Slurm scripts: launch/torchrun.py and launch/run.py) set
$JAMBA_OUTCOME to a file path; the first rank to finish its job in a known way writes {rc, line, host}
there (created exclusively: one writer), and the launcher ends with that line and status. Without the
variable (plain `python -m train`, raw torchrun) nothing is written.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

ENV = "JAMBA_OUTCOME"
STOPPED, FAILED = 0, 2  # a handled stop; a config, data or checkpoint error


def write(rc: int, line: str) -> bool:
    """Record the job's end; False when another rank recorded it first (its line is the cause)."""
    path = os.environ.get(ENV)
    if not path:
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True  # the launcher's folder is gone: the line is still printed by this rank
    with os.fdopen(fd, "w") as f:
        json.dump({"rc": rc, "line": line, "host": socket.gethostname()}, f)
    return True


def recorded() -> bool:
    """Another rank already recorded the job's end (this rank's error is then a consequence)."""
    path = os.environ.get(ENV)
    return bool(path) and Path(path).is_file()


def read(path: str | Path) -> dict | None:
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and isinstance(out.get("rc"), int) else None


def exit_status(path: str | Path, rc: int, everywhere: bool = False) -> int:
    """A launcher's exit status from the ranks' record (rc: the launcher's own, when none was written).
    A failure's line is printed again, last, on the host of the rank that wrote it (`everywhere`: here)."""
    got = read(path)
    if got is None:
        return rc
    if got["rc"] != STOPPED and (everywhere or got.get("host") == socket.gethostname()):
        print(got["line"], file=sys.stderr, flush=True)
    return got["rc"]


if __name__ == "__main__":  # `python -m train.outcome FILE RC`: a batch script's last word
    sys.exit(exit_status(sys.argv[1], int(sys.argv[2]), everywhere=True))
