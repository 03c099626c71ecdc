"""Small host helpers shared by the tests, the benchmark and ``pam demo``.

:func:`free_port` asks the kernel for a loopback TCP port nobody holds right
now; :func:`child_pids` lists a process's direct children from procfs. They
lived in four and two copies; this is their one home.

Invariants: nothing here keeps a socket or a file open past its call, and
:func:`child_pids` never raises for a process that exits while it looks.
A free port is only free at the moment it is returned (another process may take
it before the caller binds it); callers that cannot tolerate that race must
bind port 0 themselves and read the port back.

Under pytest-xdist (``PYTEST_XDIST_WORKER`` is ``gw0``, ``gw1``, ...) each
worker takes its ports from a block of its own below the kernel's ephemeral
range, so a port one worker was given and has not bound yet (a daemon's API
port between ``gateway init`` and ``gateway run``) is never handed to another
worker; the kernel's own picks (``bind(0)``, outgoing connections) come from
the ephemeral range (read from procfs) and cannot take it either. A worker walks
its block in a shuffled order, so it is not handed the same port twice (two
ports given out before either is bound) until it has gone through the block.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOOPBACK_HOST", "child_pids", "free_port"]

LOOPBACK_HOST = "127.0.0.1"
# /proc/PID/stat after the ") " that closes the command name: field 4 (ppid)
# is index 1 (proc(5)).
_PPID_INDEX = 4 - 3

#: Set by pytest-xdist in each worker process (and inherited by its children).
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"
#: Worker N's ports are [BASE + N * SIZE, BASE + (N + 1) * SIZE): 25 blocks fit
#: below 32768, where Linux's default ip_local_port_range begins; only the blocks
#: below this host's range (ip(7), ip_local_port_range) are used.
_WORKER_PORT_BASE = 20000
_WORKER_PORT_BLOCK_SIZE = 500
_EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_PORT_START = 32768
#: Ports of the block tried before giving up on it (taken ones are skipped).
_WORKER_PORT_ATTEMPTS = 50
#: Each block's ports in the order this process hands them out.
_block_orders: dict[range, Iterator[int]] = {}


def free_port(host: str = LOOPBACK_HOST) -> int:
    """A TCP port on *host* that was free when this returned."""
    block = _worker_port_block()
    if block is not None:
        order = _block_orders.setdefault(block, _shuffled_forever(block))
        for candidate in itertools.islice(order, _WORKER_PORT_ATTEMPTS):
            if _is_bindable(host, candidate):
                return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _worker_port_block() -> range | None:
    """This xdist worker's ports, or None outside xdist (or past the last block)."""
    worker = os.environ.get(XDIST_WORKER_ENV, "")
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return None
    start = _WORKER_PORT_BASE + int(worker[2:]) * _WORKER_PORT_BLOCK_SIZE
    end = start + _WORKER_PORT_BLOCK_SIZE
    return range(start, end) if end <= _ephemeral_port_start() else None


def _ephemeral_port_start() -> int:
    try:
        return int(_EPHEMERAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_PORT_START


def _shuffled_forever(block: range) -> Iterator[int]:
    """The ports of *block*, each once per pass, a new random order each pass."""
    while True:
        ports = list(block)
        random.shuffle(ports)
        yield from ports


def _is_bindable(host: str, port: int) -> bool:
    # No SO_REUSEADDR: a port with a connection still in TIME_WAIT counts as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


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
