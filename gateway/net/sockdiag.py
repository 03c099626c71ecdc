"""The owner of one TCP socket, asked of the kernel by its address (Linux sock_diag).

``/proc/net/tcp`` lists every socket of the host, so reading it per connection
costs in proportion to the host's sockets (a client that reconnects in a loop
leaves thousands in time-wait: tens of milliseconds a lookup). The kernel's
socket diagnostics (sock_diag(7), ``NETLINK_SOCK_DIAG``) answer for one socket
named by its four-tuple: an ``inet_diag_req_v2`` without ``NLM_F_DUMP`` is an
exact lookup in the kernel's hash tables (``inet_diag_find_one_icsk``), and
the answer's ``inet_diag_msg`` carries the socket's uid and inode.

Layouts (linux/netlink.h, linux/inet_diag.h; host byte order except the
ports and addresses, which are network order)::

    nlmsghdr          len u32 | type u16 | flags u16 | seq u32 | pid u32
    inet_diag_req_v2  family u8 | protocol u8 | ext u8 | pad u8 | states u32 | id
    inet_diag_sockid  sport be16 | dport be16 | src 16 bytes | dst 16 bytes
                      | if u32 | cookie 2 x u32
    inet_diag_msg     family u8 | state u8 | timer u8 | retrans u8 | id
                      | expires u32 | rqueue u32 | wqueue u32 | uid u32 | inode u32

Invariant: as with the table, a socket without an inode (time-wait, orphan) has
no owner here; and only the kernel's answer counts.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Final

__all__ = ["SockDiagUnavailable", "tcp_socket_owner"]

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLM_F_REQUEST: Final = 0x01
NLMSG_ERROR: Final = 2
#: "no cookie": look the socket up by its addresses alone.
_NO_COOKIE: Final = 0xFFFFFFFF
_ALL_STATES: Final = 0xFFFFFFFF

_HEADER = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_MESSAGE_HEAD = struct.Struct("=BBBB")
_MESSAGE_TAIL = struct.Struct("=IIIII")
_ERROR = struct.Struct("=i")
_TIMEOUT_SECONDS: Final = 1.0


class SockDiagUnavailable(OSError):
    """The kernel's socket diagnostics cannot be asked here (not Linux, no module)."""


def _request(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    body = (
        _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES)
        + _SOCKID.pack(sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0"))
        + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    )
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body


def _ask(request: bytes) -> int | None:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise SockDiagUnavailable(str(exc)) from None
    with sock:
        sock.settimeout(_TIMEOUT_SECONDS)
        try:
            sock.sendall(request)
            answer = sock.recv(8192)
        except OSError as exc:  # a timeout included: the caller reads the table
            raise SockDiagUnavailable(str(exc) or type(exc).__name__) from None
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(answer)
    if kind == NLMSG_ERROR:
        (code,) = _ERROR.unpack_from(answer, _HEADER.size)
        if -code in (errno.ENOENT, 0):
            return None  # no such socket
        raise SockDiagUnavailable(f"sock_diag answered {errno.errorcode.get(-code, -code)}")
    if kind != SOCK_DIAG_BY_FAMILY or length > len(answer):
        raise SockDiagUnavailable("sock_diag answered something else")
    offset = _HEADER.size + _MESSAGE_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size
    _expires, _rqueue, _wqueue, uid, inode = _MESSAGE_TAIL.unpack_from(answer, offset)
    return uid if inode else None


def tcp_socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket whose own address is *local* and whose peer
    is *remote* (the client's socket: *local* is the client's address as we see
    it); None when there is none or it has no owner. Raises
    :class:`SockDiagUnavailable` when the kernel cannot be asked."""
    mine = ipaddress.ip_address(local[0].partition("%")[0])
    theirs = ipaddress.ip_address(remote[0].partition("%")[0])
    attempts = []
    mapped = [
        a.ipv4_mapped
        for a in (mine, theirs)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None
    ]
    if len(mapped) == 2:  # a dual-stack view of an IPv4 connection: ask as IPv4 first
        attempts.append((socket.AF_INET, mapped[0].packed, mapped[1].packed))
    family = socket.AF_INET if mine.version == 4 else socket.AF_INET6
    attempts.append((family, mine.packed, theirs.packed))
    for family, src, dst in attempts:
        uid = _ask(_request(family, src, local[1], dst, remote[1]))
        if uid is not None:
            return uid
    return None
