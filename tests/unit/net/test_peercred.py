"""The owner of a local connection: the socket table parser, byte-exact on tables
captured from this machine (``data/proc_net_tcp*.txt``: a root client, a uid
65534 client, an IPv6 client and an IPv4 client of a dual-stack server, plus
time-wait rows), and the live lookup with real sockets and real processes."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.net import peercred, sockdiag
from gateway.net.peercred import (
    SocketRow,
    decode_endpoint,
    find_owner,
    is_available,
    parse_socket_table,
    socket_peer_owner,
    tcp_peer_owner,
)

DATA = Path(__file__).parent / "data"
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
LOOPBACK = V4("127.0.0.1")
ANY = V4(0)


def table(name: str) -> str:
    return (DATA / name).read_text(encoding="ascii")


def test_an_ipv4_endpoint_is_a_little_endian_word_and_a_port() -> None:
    assert decode_endpoint("0100007F:D431", byteorder="little") == (LOOPBACK, 54321)
    assert decode_endpoint("7F000001:D431", byteorder="big") == (LOOPBACK, 54321)
    assert decode_endpoint("00000000:0000", byteorder="little") == (ANY, 0)


def test_an_ipv6_endpoint_is_four_words_and_a_mapped_one_reads_as_ipv4() -> None:
    loopback6 = "00000000000000000000000001000000:81A2"
    assert decode_endpoint(loopback6, byteorder="little") == (V6("::1"), 33186)
    mapped = "0000000000000000FFFF00000100007F:D432"
    assert decode_endpoint(mapped, byteorder="little") == (LOOPBACK, 54322)


@pytest.mark.parametrize("text", ["0100007F", "0100007F:D4", "01007F:D431", "zz00007F:D431"])
def test_a_malformed_endpoint_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        decode_endpoint(text, byteorder="little")


def test_the_captured_ipv4_table_parses_row_by_row() -> None:
    rows = parse_socket_table(table("proc_net_tcp.txt"), byteorder="little")
    assert len(rows) == 11
    assert rows[0] == SocketRow((ANY, 2024), (ANY, 0), 0x0A, 0, 312)
    assert rows[4] == SocketRow((LOOPBACK, 55566), (LOOPBACK, 54321), 1, 0, 848725)
    assert rows[5] == SocketRow((LOOPBACK, 55576), (LOOPBACK, 54321), 1, 65534, 848735)
    assert rows[7] == SocketRow((LOOPBACK, 54321), (LOOPBACK, 55576), 1, 0, 848736)
    # time-wait rows: no process holds them, and the kernel prints uid 0
    assert rows[8] == SocketRow((LOOPBACK, 40387), (LOOPBACK, 36446), 6, 0, 0)


def test_the_captured_ipv6_table_parses_row_by_row() -> None:
    rows = parse_socket_table(table("proc_net_tcp6.txt"), byteorder="little")
    assert rows == [
        SocketRow((V6("::"), 54322), (V6("::"), 0), 0x0A, 0, 848724),
        SocketRow((LOOPBACK, 54322), (LOOPBACK, 39776), 1, 0, 848740),
        SocketRow((V6("::1"), 33186), (V6("::1"), 54322), 1, 0, 848737),
        SocketRow((V6("::1"), 54322), (V6("::1"), 33186), 1, 0, 848738),
    ]


def test_the_owner_is_the_row_at_the_peer_facing_us_not_our_own_row() -> None:
    rows = parse_socket_table(table("proc_net_tcp.txt"), byteorder="little")
    ours = (LOOPBACK, 54321)
    assert find_owner(rows, peer=(LOOPBACK, 55576), ours=ours) == 65534
    assert find_owner(rows, peer=(LOOPBACK, 55566), ours=ours) == 0
    # our own end of the same connection is not the client's socket
    assert find_owner(rows, peer=ours, ours=(LOOPBACK, 55576)) == 0
    assert find_owner(rows, peer=(LOOPBACK, 55577), ours=ours) is None


def test_a_mapped_peer_address_finds_the_ipv4_row() -> None:
    rows = parse_socket_table(table("proc_net_tcp.txt"), byteorder="little")
    # the dual-stack server sees its IPv4 client as ::ffff:127.0.0.1
    peer = (V6("::ffff:127.0.0.1"), 39776)
    assert find_owner(rows, peer=peer, ours=(V6("::ffff:127.0.0.1"), 54322)) == 0
    rows6 = parse_socket_table(table("proc_net_tcp6.txt"), byteorder="little")
    assert find_owner(rows6, peer=(V6("::1"), 33186), ours=(V6("::1"), 54322)) == 0


def test_a_row_no_process_holds_has_no_owner() -> None:
    rows = parse_socket_table(table("proc_net_tcp.txt"), byteorder="little")
    # row 8 is time-wait: uid 0 there must not pass for root
    assert find_owner(rows, peer=(LOOPBACK, 40387), ours=(LOOPBACK, 36446)) is None


def test_a_truncated_row_is_an_error() -> None:
    header = table("proc_net_tcp.txt").splitlines()[0]
    with pytest.raises(ValueError, match="not a socket table row"):
        parse_socket_table(f"{header}\n   0: 0100007F:D431 00000000:0000 0A\n")


# --- the live lookup ----------------------------------------------------------------

needs_proc = pytest.mark.skipif(not is_available(), reason="needs Linux /proc/net/tcp")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")


@pytest.fixture
def server4() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@needs_proc
def test_a_live_ipv4_connection_is_owned_by_this_process_uid(server4: socket.socket) -> None:
    with socket.create_connection(server4.getsockname()) as client:
        accepted, _ = server4.accept()
        with accepted:
            assert socket_peer_owner(accepted) == os.geteuid()
            assert tcp_peer_owner(client.getsockname(), accepted.getsockname()) == os.geteuid()


@needs_proc
def test_a_live_ipv6_and_a_mapped_connection_are_found() -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        for host in ("::1", "127.0.0.1"):
            with socket.create_connection((host, port)) as _client:
                accepted, _ = server.accept()
                with accepted:
                    assert socket_peer_owner(accepted) == os.geteuid(), host


@needs_proc
def test_a_closed_client_has_no_owner(server4: socket.socket) -> None:
    client = socket.create_connection(server4.getsockname())
    accepted, _ = server4.accept()
    client.close()
    with accepted:
        # the client's socket is an orphan (FIN_WAIT2, no inode) or gone
        assert socket_peer_owner(accepted) is None


@needs_proc
@needs_root
def test_a_client_of_another_uid_is_that_uid(server4: socket.socket) -> None:
    host, port = server4.getsockname()
    code = f"import socket,sys; s=socket.create_connection(({host!r},{port})); sys.stdin.read()"
    child = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
    )
    try:
        accepted, _ = server4.accept()
        with accepted:
            assert socket_peer_owner(accepted) == 65534
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)


def test_a_unix_socket_peer_is_found_by_peercred(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            accepted, _ = server.accept()
            with accepted:
                assert socket_peer_owner(accepted) == os.geteuid()


def test_without_a_table_the_check_is_unavailable(tmp_path: Path) -> None:
    assert not is_available(tmp_path)
    assert tcp_peer_owner(("127.0.0.1", 1), ("127.0.0.1", 2), proc_net=tmp_path) is None


# --- sock_diag: the exact lookup the live check uses (gateway.net.sockdiag); the
# live tests above go through it, the table is its fallback ----------------------------


@needs_proc
def test_the_owner_of_a_live_client_socket_is_this_uid(server4: socket.socket) -> None:
    with socket.create_connection(server4.getsockname()) as client:
        accepted, _ = server4.accept()
        with accepted:
            # The client's socket: its own address is our peer, its peer is us.
            assert sockdiag.tcp_socket_owner(accepted.getpeername(), accepted.getsockname()) == (
                os.geteuid()
            )
            # Our own accepted socket is found the same way, from its side.
            assert sockdiag.tcp_socket_owner(client.getpeername(), client.getsockname()) == (
                os.geteuid()
            )


@needs_proc
def test_a_socket_that_does_not_exist_has_no_owner(server4: socket.socket) -> None:
    assert sockdiag.tcp_socket_owner(("127.0.0.1", 1), server4.getsockname()) is None


@needs_proc
def test_without_sock_diag_the_table_answers_the_same(
    server4: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*_args: object) -> int | None:
        raise sockdiag.SockDiagUnavailable("not here")

    with socket.create_connection(server4.getsockname()):
        accepted, _ = server4.accept()
        with accepted:
            peer, ours = accepted.getpeername(), accepted.getsockname()
            asked = peercred.tcp_peer_owner(peer, ours)
            monkeypatch.setattr(peercred, "tcp_socket_owner", unavailable)
            assert peercred.tcp_peer_owner(peer, ours) == asked == os.geteuid()
