"""The run directory: one job at a time (a lock held for the life of the job), and what a job records there
once it is known to start (Hydra's .hydra/*.yaml and train.log), never before.

The lock is <run_dir>/.lock, a JSON file {pid, host, start, since} created with O_EXCL by rank 0 and touched
every HEARTBEAT_S seconds. A lock is stale when its process is gone (same host: no such pid, or a pid
reused by another process) or, for a holder on another host, when it has not been touched for STALE_S
seconds; a stale lock is taken over with a warning. Any other holder makes a second job fail at once.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoint import atomic_write

log = logging.getLogger("train.rundir")
LOCK_FILE = ".lock"
LOG_FILE = "train.log"
HEARTBEAT_S = 10.0
STALE_S = 120.0


class RunLockError(RuntimeError):
    """The run directory is in use by another live job; the message names it."""


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir).absolute() / LOCK_FILE
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created = False

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def stale_reason(self, holder: dict | None, path: Path) -> str | None:
        """Why the lock at `path` (content `holder`) is stale, or None when its holder may be alive."""
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
            return f"unreadable, {age:.0f} s old" if age > 2 * HEARTBEAT_S else None
        if holder.get("host") == self.me["host"]:
            pid = holder["pid"]
            if not _alive(pid):
                return f"pid {pid} is not running"
            if holder.get("start") is not None and _start_time(pid) not in (None, holder["start"]):
                return f"pid {pid} is another process now"
            return None
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def describe(self, holder: dict | None) -> str:
        if not isinstance(holder, dict):
            return f"an unreadable lock {self.path}"
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')}; lock {self.path})"
        )

    def acquire(self) -> RunLock:
        self.created = not self.path.parent.exists()  # by this attempt: removed again if left empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                why = self.stale_reason(holder, self.path)
                if why is None:
                    raise RunLockError(
                        f"{self.path.parent} is in use by {self.describe(holder)}: stop that job, or use "
                        f"another run_name"
                    ) from None
                # Several takers may race: only one rename of this lock succeeds, and a taker checks it
                # moved the stale lock it judged, not a fresh one that another taker created meanwhile.
                grave = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, grave)
                except FileNotFoundError:
                    continue
                if self._read(grave) != holder:
                    os.rename(grave, self.path)
                    continue
                grave.unlink()
                log.warning("taking over the stale lock of %s: %s", self.describe(holder), why)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.me, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockError(f"{self.path}: other jobs are taking this run directory at the same moment")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("cannot refresh the run lock %s: %s", self.path, e)

    def held(self) -> bool:
        holder = self._read(self.path)
        return isinstance(holder, dict) and all(holder.get(k) == v for k, v in self.me.items())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held():
            self.path.unlink(missing_ok=True)
            if self.created:
                remove_if_empty(self.path.parent)


def remove_if_empty(run_dir: Path) -> bool:
    """Remove a run directory that holds nothing but empty files and folders (an attempt that failed or
    stopped before its first step, in a directory it created); False when anything in it has content."""
    files = [p for p in run_dir.rglob("*") if not p.is_dir()]
    if any(p.is_symlink() or p.stat().st_size for p in files):
        return False
    for p in files:
        p.unlink()
    for d in sorted((p for p in run_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    run_dir.rmdir()
    return True


# ---- the job's record: Hydra's files and the log, written once the job is known to start --------------
def buffer_log() -> logging.handlers.MemoryHandler:
    """Hold this process's log records until `record_job` knows where they go (nothing is written before)."""
    buf = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(buf)
    return buf


def record_job(run_dir: Path, dcfg: DictConfig, buf: logging.handlers.MemoryHandler | None) -> None:
    """Rank 0, after the lock is held and the run is known to start: .hydra/{config,hydra,overrides}.yaml
    (what Hydra would have written at start-up) and train.log, beginning with the buffered start-up log."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", OmegaConf.to_yaml(dcfg))
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        atomic_write(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
        atomic_write(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))))
    root = logging.getLogger()
    handler = logging.FileHandler(run_dir / LOG_FILE, mode="a")
    console = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)), None)
    if console is not None and console.formatter is not None:
        handler.setFormatter(console.formatter)
    if buf is not None:
        buf.setTarget(handler)
        buf.flush()
        root.removeHandler(buf)
        buf.close()
    root.addHandler(handler)
