"""Two hosts on one machine: a pair of network namespaces joined by a veth pair.

:class:`TwoHosts` creates (as root) two namespaces named uniquely for this run,
a veth pair between them with an address in a private /30 on each end, and
loopback up in both; :meth:`TwoHosts.close` deletes both namespaces (which
deletes the veth pair with them), and is safe to call after a partial set-up.

A process runs on a "host" through ``ip netns exec NAME cmd`` (:meth:`Namespace.argv`:
iproute2 execs the command itself, so the child's pid is the command's). Code
in this process reaches a host through :meth:`Namespace.entered`, which moves the
*calling thread* (setns(2) is per thread) into the namespace and back: a socket
keeps the namespace it was created in, so a psycopg connection opened inside
stays there after the block. Anything that opens a new socket later (libpq's
cancel) must run inside the block again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: setns(2)'s nstype for a network namespace (<linux/sched.h>)
CLONE_NEWNET = 0x40000000
#: pidfd_open(2) and pidfd_getfd(2) on x86_64 and aarch64 (asm-generic numbers)
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
#: the private /30 between the two hosts (RFC 1918); each namespace has its own
#: routing table, so the same addresses in two concurrent runs do not clash
GATEWAY_ADDRESS = "10.213.0.1"
LAPTOP_ADDRESS = "10.213.0.2"
PREFIX = 30

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Namespace:
    """One named network namespace (``/run/netns/NAME``)."""

    name: str
    #: this host's end of the veth pair, and its address
    interface: str
    address: str

    def argv(self, *command: str) -> list[str]:
        """``command`` as run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block's socket calls from this namespace (this thread only)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _check(_libc.setns(target, CLONE_NEWNET))
            finally:
                os.close(target)
            try:
                yield
            finally:
                _check(_libc.setns(own, CLONE_NEWNET))
        finally:
            os.close(own)

    def can_connect(self, host: str, port: int, timeout: float = 5.0) -> bool:
        """Whether a TCP connection from this host to host:port is accepted."""
        with self.entered():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
            except OSError:
                return False
            return True


@dataclass
class TwoHosts:
    """A "gateway host" and a "laptop" namespace, joined by a veth pair."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[Namespace] = field(default_factory=list)

    @property
    def gateway(self) -> Namespace:
        # interface names must fit IFNAMSIZ (15 characters)
        return Namespace(f"pam-gw-{self.tag}", f"vgw{self.tag}", GATEWAY_ADDRESS)

    @property
    def laptop(self) -> Namespace:
        return Namespace(f"pam-lt-{self.tag}", f"vlt{self.tag}", LAPTOP_ADDRESS)

    def create(self) -> TwoHosts:
        """Build both namespaces and the link; on failure, remove what was made."""
        try:
            for ns in (self.gateway, self.laptop):
                _ip("netns", "add", ns.name)
                self.created.append(ns)
                ns.ip("link", "set", "lo", "up")
            gw, lt = self.gateway, self.laptop
            # Made inside the gateway's namespace, its peer moved to the laptop's:
            # nothing of this test is ever on the machine's own network.
            gw.ip("link", "add", gw.interface, "type", "veth", "peer", "name", lt.interface)
            gw.ip("link", "set", lt.interface, "netns", lt.name)
            for ns in (gw, lt):
                ns.ip("addr", "add", f"{ns.address}/{PREFIX}", "dev", ns.interface)
                ns.ip("link", "set", ns.interface, "up")
        except BaseException:
            self.close()
            raise
        return self

    def set_link(self, up: bool) -> None:
        """Bring the laptop's end of the link up or down (the gateway "unreachable")."""
        self.laptop.ip("link", "set", self.laptop.interface, "up" if up else "down")

    def close(self) -> None:
        """Delete the namespaces (and so the veth pair). Idempotent."""
        while self.created:
            ns = self.created.pop()
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)

    def __enter__(self) -> TwoHosts:
        return self.create()

    def __exit__(self, *_exc: object) -> None:
        self.close()


def peer_sockets(pid: int) -> list[socket.socket]:
    """Duplicates of the TCP sockets process ``pid`` holds (pidfd_getfd(2), as root),
    so their options can be read; the caller closes them."""
    pidfd = _check(_libc.syscall(_SYS_PIDFD_OPEN, pid, 0))
    found: list[socket.socket] = []
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if not os.readlink(entry).startswith("socket:"):
                    continue
                fd = _check(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(entry.name), 0))
            except OSError:
                continue  # closed while we looked
            sock = socket.socket(fileno=fd)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                found.append(sock)
            else:
                sock.detach()
                os.close(fd)
    finally:
        os.close(pidfd)
    return found
