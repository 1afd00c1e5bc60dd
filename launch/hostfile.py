"""Hostfiles in DeepSpeed's (MPI-style) format: one `hostname slots=N` line per node.

    # comments and blank lines are ignored
    node-001 slots=8
    node-002 slots=8

DeepSpeed's own parser stops at the first problem with "bad entry"; this one names the line and the fix,
and also checks what our launchers need (every node the same number of slots for torchrun and srun).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_\[][A-Za-z0-9_.:\-\[\]@]*)\s+slots\s*=\s*(?P<slots>\S+)\s*$")
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class HostfileError(ValueError):
    """A hostfile that cannot be launched from; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # processes (GPUs) on this node

    def line(self) -> str:
        return f"{self.name} slots={self.slots}"


def parse_hostfile(text: str, source: str = "<hostfile>") -> list[Host]:
    """Hosts in file order (the first is node rank 0 and, by default, the master)."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise HostfileError(
                f"{source}:{lineno}: cannot parse {raw.strip()!r}; expected 'HOSTNAME slots=N', "
                f"e.g. 'node-001 slots=8'"
            )
        name, slots = m.group("host"), m.group("slots")
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{source}:{lineno}: slots must be a positive integer, got {slots!r}")
        if name in seen:
            raise HostfileError(
                f"{source}:{lineno}: host {name!r} is listed again (first on line {seen[name]}); "
                f"list each node once with all its slots"
            )
        seen[name] = lineno
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise HostfileError(f"{source}: no hosts (expected lines like 'node-001 slots=8')")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    p = Path(path)
    if not p.is_file():
        raise HostfileError(f"hostfile {p} does not exist")
    return parse_hostfile(p.read_text(), str(p))


def hostfile_text(hosts: list[Host]) -> str:
    """What `read_hostfile` reads back: one `HOST slots=N` line per host."""
    return "".join(h.line() + "\n" for h in hosts)


def uniform_slots(hosts: list[Host], why: str) -> int:
    """The common slot count; torchrun and srun start the same number of processes on every node."""
    counts = {h.slots for h in hosts}
    if len(counts) != 1:
        raise HostfileError(
            f"{why} needs the same slots on every host, got "
            + ", ".join(f"{h.name}={h.slots}" for h in hosts)
        )
    return counts.pop()


def is_local(name: str) -> bool:
    """This machine: run there directly, without ssh."""
    return name in LOCAL_NAMES or name in (socket.gethostname(), socket.getfqdn())
