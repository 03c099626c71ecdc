"""Which OS user owns the other end of a local connection (Linux).

A grant's port is on loopback, so its client is a process on this host; the
kernel knows which uid created that process's socket. For TCP it says so in its
socket table, ``/proc/net/tcp`` and ``/proc/net/tcp6`` (proc(5), "/proc/net/tcp";
the rows are printed by ``get_tcp4_sock``/``get_tcp6_sock`` in the kernel's
``net/ipv4/tcp_ipv4.c`` and ``net/ipv6/tcp_ipv6.c``): the client's own socket is
the row whose local address is our peer's address and whose remote address is
our end. For a Unix socket the kernel answers directly (``SO_PEERCRED``,
unix(7)).

:func:`parse_socket_table` is pure (text in, rows out) and
:func:`find_owner` picks the row; :func:`tcp_peer_owner` and
:func:`socket_peer_owner` are the thin wrappers that ask the kernel: for one
socket through sock_diag (:mod:`gateway.net.sockdiag`: an exact lookup), or,
where that is unavailable, by reading the table (a scan of every socket).

Invariants:

* A row only counts with a socket inode (not 0): a time-wait entry or a socket
  its process has already closed (an orphan) has none, and the kernel prints uid
  0 for some of them, which would pass for root. Such a peer has no owner here.
* Addresses compare as IP addresses, an IPv4-mapped IPv6 address as its IPv4
  address, so a dual-stack socket's ``::ffff:127.0.0.1`` matches an IPv4 row.
* Nothing here is taken from what the client sends: only the kernel's answer.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.net.sockdiag import SockDiagUnavailable, tcp_socket_owner

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: An endpoint as the table names it: (address, port).
Endpoint = tuple[IPAddress, int]
ByteOrder = Literal["little", "big"]

#: Where the kernel publishes this network namespace's tables.
PROC_NET = Path("/proc/net")
#: The socket tables, IPv4 first (a loopback client is most often IPv4).
TCP_TABLES = ("tcp", "tcp6")
#: Columns of a row, split on whitespace (proc(5)).
_LOCAL, _REMOTE, _STATE, _UID, _INODE = 1, 2, 3, 7, 9
#: struct ucred {pid_t pid; uid_t uid; gid_t gid;} (unix(7), SO_PEERCRED).
_UCRED = struct.Struct("=iII")


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One row of a TCP socket table: a socket and the uid that created it."""

    local: Endpoint
    remote: Endpoint
    #: the TCP state, as the kernel numbers it (1 established, 10 listen, ...)
    state: int
    uid: int
    #: the socket's inode; 0 for an entry no process holds (time-wait, orphan)
    inode: int


def decode_endpoint(text: str, *, byteorder: ByteOrder = sys.byteorder) -> Endpoint:
    """``0100007F:1F90`` -> (127.0.0.1, 8080).

    The kernel prints each 32-bit word of the address (one for IPv4, four for
    IPv6) as a number in the host's byte order, and the port as a number.
    """
    address_hex, _, port_hex = text.partition(":")
    if len(address_hex) not in (8, 32) or len(port_hex) != 4:
        raise ValueError(f"not a socket table address: {text!r}")
    words = [int(address_hex[i : i + 8], 16) for i in range(0, len(address_hex), 8)]
    raw = b"".join(word.to_bytes(4, byteorder) for word in words)
    return _normal(ipaddress.ip_address(raw)), int(port_hex, 16)


def parse_socket_table(text: str, *, byteorder: ByteOrder = sys.byteorder) -> list[SocketRow]:
    """The rows of a ``/proc/net/tcp`` or ``/proc/net/tcp6`` text (header skipped)."""
    return list(_rows(text, byteorder))


def find_owner(rows: Iterable[SocketRow], *, peer: Endpoint, ours: Endpoint) -> int | None:
    """The uid of the socket at ``peer`` connected to ``ours``; None if no process
    holds one (see the module's invariants)."""
    peer, ours = (_normal(peer[0]), peer[1]), (_normal(ours[0]), ours[1])
    for row in rows:
        if row.local == peer and row.remote == ours and row.inode != 0:
            return row.uid
    return None


def is_available(proc_net: Path = PROC_NET) -> bool:
    """Whether this system publishes a TCP socket table (Linux with /proc)."""
    return (proc_net / TCP_TABLES[0]).is_file()


def tcp_peer_owner(
    peer: tuple[str, int], ours: tuple[str, int], *, proc_net: Path = PROC_NET
) -> int | None:
    """The uid owning the client end of the TCP connection ``peer`` -> ``ours``;
    None when no local socket matches. Asked of the kernel for that one socket
    (:mod:`gateway.net.sockdiag`), or where that cannot be asked, read from
    the live tables. Blocking: call it off the event loop."""
    if proc_net == PROC_NET:
        try:
            uid = tcp_socket_owner(peer, ours)
        except SockDiagUnavailable:
            uid = None
        if uid is not None:
            return uid
        # No answer: the socket is gone, or sock_diag has no TCP handler here
        # (it then says ENOENT too): the table answers either way, at the cost
        # of a scan, only for connections the kernel did not name.
    wanted_peer = (_normal(ipaddress.ip_address(peer[0].partition("%")[0])), peer[1])
    wanted_ours = (_normal(ipaddress.ip_address(ours[0].partition("%")[0])), ours[1])
    for name in TCP_TABLES:
        try:
            text = (proc_net / name).read_text(encoding="ascii")
        except FileNotFoundError:  # no IPv6 on this host
            continue
        uid = find_owner(_rows(text), peer=wanted_peer, ours=wanted_ours)
        if uid is not None:
            return uid
    return None


def socket_peer_owner(sock: socket.socket) -> int | None:
    """The uid owning the other end of an accepted socket (TCP or Unix)."""
    if sock.family == socket.AF_UNIX:
        _pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return int(uid)
    peer, ours = sock.getpeername(), sock.getsockname()
    return tcp_peer_owner((peer[0], peer[1]), (ours[0], ours[1]))


def _rows(text: str, byteorder: ByteOrder = sys.byteorder) -> Iterator[SocketRow]:
    """Rows one at a time, so a lookup stops at its match."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        if len(fields) <= _INODE:
            raise ValueError(f"not a socket table row: {line!r}")
        yield SocketRow(
            local=decode_endpoint(fields[_LOCAL], byteorder=byteorder),
            remote=decode_endpoint(fields[_REMOTE], byteorder=byteorder),
            state=int(fields[_STATE], 16),
            uid=int(fields[_UID]),
            inode=int(fields[_INODE]),
        )


def _normal(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


__all__ = [
    "SocketRow",
    "decode_endpoint",
    "find_owner",
    "is_available",
    "parse_socket_table",
    "socket_peer_owner",
    "tcp_peer_owner",
]
