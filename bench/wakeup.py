"""What a system call that wakes another process costs on this machine.

``python -m bench.wakeup`` ping-pongs 100-byte messages between two processes over
a loopback TCP connection and a unix socket pair, unpinned and with both on CPU 0,
and prints the sender's CPU per ``send()`` and the round-trip time. A proxy makes
two such calls per direction per round trip, so on a VM where waking a process on
the other vCPU is expensive this is the floor under the gateway's CPU per
transaction (see docs/performance.md, "Where the gateway's CPU goes").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROUND_TRIPS = 20_000
MESSAGE = b"x" * 100


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


def measure(kind: str) -> tuple[float, float]:
    """(sender CPU µs per send, wall µs per round trip) over *kind* ("tcp" or "unix")."""
    near, far = _pair(kind)
    pid = os.fork()
    if pid == 0:  # the echoing peer
        near.close()
        for _ in range(ROUND_TRIPS):
            far.send(far.recv(1000))
        os._exit(0)
    far.close()
    send_cpu = 0.0
    started = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        before = time.process_time()
        near.send(MESSAGE)
        send_cpu += time.process_time() - before
        near.recv(1000)
    wall = time.perf_counter() - started
    os.waitpid(pid, 0)
    near.close()
    return send_cpu / ROUND_TRIPS * 1e6, wall / ROUND_TRIPS * 1e6


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        for kind in ("tcp", "unix"):
            cpu, wall = measure(kind)
            print(f"  {kind:4}  send {cpu:5.1f} µs CPU   round trip {wall:6.1f} µs")
        return 0
    for label, prefix in (("unpinned", []), ("both on CPU 0", ["taskset", "-c", "0"])):
        print(label)
        sys.stdout.flush()
        subprocess.run([*prefix, sys.executable, "-m", "bench.wakeup", "--child"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
