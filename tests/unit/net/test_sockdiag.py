"""Tests of gateway.net.sockdiag: the kernel's exact answer for one TCP socket's
owner, against real sockets (and a process of another uid), and the fallback to
the socket table when sock_diag cannot be asked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gateway.net import peercred, sockdiag

needs_linux = pytest.mark.skipif(not peercred.is_available(), reason="needs Linux")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")


@pytest.fixture
def server4() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@needs_linux
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


@needs_linux
def test_a_socket_that_does_not_exist_has_no_owner(server4: socket.socket) -> None:
    assert sockdiag.tcp_socket_owner(("127.0.0.1", 1), server4.getsockname()) is None


@needs_linux
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
            peer, ours = accepted.getpeername(), accepted.getsockname()
            assert sockdiag.tcp_socket_owner(peer, ours) == 65534
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)


@needs_linux
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
