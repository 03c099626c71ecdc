"""Small host helpers shared by the tests, the benchmark and ``pam demo``.

:func:`free_port` asks the kernel for a loopback TCP port nobody holds right
now; :func:`child_pids` lists a process's direct children from procfs. They
lived in four and two copies; this is their one home.

Invariants: nothing here keeps a socket or a file open past its call, and
:func:`child_pids` never raises for a process that exits while it looks.
A free port is only free at the moment it is returned (another process may take
it before the caller binds it); callers that cannot tolerate that race must
bind port 0 themselves and read the port back.
"""

from __future__ import annotations

import socket
from pathlib import Path

__all__ = ["LOOPBACK_HOST", "child_pids", "free_port"]

LOOPBACK_HOST = "127.0.0.1"
# /proc/PID/stat after the ") " that closes the command name: field 4 (ppid)
# is index 1 (proc(5)).
_PPID_INDEX = 4 - 3


def free_port(host: str = LOOPBACK_HOST) -> int:
    """A TCP port on *host* that was free when this returned."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def child_pids(parent: int) -> list[int]:
    """Live direct children of *parent* (from ``/proc/PID/stat``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may itself contain ") ", hence rpartition.
            stat = (entry / "stat").read_text().rpartition(") ")[2].split()
            if int(stat[_PPID_INDEX]) == parent:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked
    return found
