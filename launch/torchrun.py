"""`python -m launch.torchrun [torchrun options] -m train [overrides]`: torchrun, with the exit status and
the last line a user (or Slurm) should see.

    python -m launch.torchrun --standalone --nproc_per_node 2 -m train trainer.max_steps=300

What it adds to torchrun (`make train`, `launch.run --launcher torchrun` and the Slurm scripts use it):
- the overrides are validated first, as a run would: a bad key is one line and exit 2, no rank starts;
- SIGINT, SIGTERM and SIGUSR1 reach the ranks (torchrun passes on SIGINT/SIGTERM only by default), which
  save and stop; the job then exits 0 with the ranks' line saying where it stopped, where torchrun alone
  exits 1 with a `SignalException` traceback. A second signal to the launcher exits at once (the ranks
  follow within a second; the newest complete checkpoint stays `latest`);
- a config, data or checkpoint error is the one line the failing rank wrote (train/outcome.py), last, and
  exit 2, without torchrun's `ChildFailedError` block.
The ranks get a shutdown grace of TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (120 here, as Slurm gives; torchrun's is 30) to
save after a signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from train import outcome

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SHUTDOWN_S = "120"


def train_overrides(argv: list[str]) -> list[str] | None:
    """The Hydra overrides after `-m train` (None: the command does not run train)."""
    for i, a in enumerate(argv[:-1]):
        if a in ("-m", "--module") and argv[i + 1] == "train":
            return argv[i + 2 :]
    for i, a in enumerate(argv):
        if a.endswith("launch/entry.py"):
            return argv[i + 1 :]
    return None


def run(argv: list[str]) -> int:
    early: list[int] = []  # a signal before any rank started: nothing to save, stop here
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: early.append(signum))
    overrides = train_overrides(argv)
    if overrides is not None:
        from train.__main__ import check_overrides  # exits 2 with one line on a bad override

        check_overrides(overrides)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    if early:
        print(f"stopped by {signal.Signals(early[0]).name} before the ranks started", file=sys.stderr)
        return 0

    def starting(signum, frame):  # rendezvous: torchrun's handlers (it passes the signal on) come next
        raise SignalException(f"got signal {signum}", sigval=signal.Signals(signum))

    own = outcome.ENV not in os.environ  # under launch.run / Slurm one file serves every node
    path = Path(os.environ.get(outcome.ENV) or tempfile.mkdtemp(prefix="jamba-") + "/outcome.json")
    os.environ[outcome.ENV] = str(path)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_S)
    # its per-rank failure and shutdown lines: the outcome says it in one (a crash still gets a line, below)
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = parse_args(["--signals-to-handle", SIGNALS, *argv])
    rc = 0
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, starting)
        torchrun(args)
    except SignalException as e:  # passed on to the ranks, which saved and exited (or were not started)
        rc = 128 + int(e.sigval)
    except ChildFailedError as e:
        rc = 1
        if outcome.read(path) is None:  # no rank said why: name the first failure (its log is above)
            rank, failure = e.get_first_failure()
            print(f"rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr, flush=True)
    try:
        return outcome.exit_status(path, rc)
    finally:
        if own:
            path.unlink(missing_ok=True)
            path.parent.rmdir()


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
