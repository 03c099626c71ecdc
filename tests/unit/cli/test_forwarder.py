"""The forwarder's failover (``cli.forwarder``): a tunnel that cannot be reached
is asked for again (``relocate``, the CLI asking the gateway now answering),
and every later connection goes where it said.

Real TLS on loopback: a tunnel server with the gateway CA's server identity,
and a client certificate issued for a grant. No gateway runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.forwarder import Forwarder, TunnelTarget
from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The tunnel's server context, and a grant's client context, of one CA."""
    box = SecretBox(bytes(range(32)))
    ca = pki.ensure_pki(tmp_path, box, ())
    key = pki.new_key()
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    cert = ca.sign_grant_csr(pki.csr_for(key), "s-1", expires)
    server = pki.tunnel_server_context(pki.load_server_identity(tmp_path, box), ca.ca_pem)
    return server, pki.tunnel_client_context(cert, key, ca.ca_pem)


@pytest.fixture
async def tunnel(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> AsyncIterator[int]:
    """A tunnel server on loopback that accepts and holds; its port."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=contexts[0])
    async with server:
        yield server.sockets[0].getsockname()[1]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _target(port: int, client: ssl.SSLContext, host: str = "127.0.0.1") -> TunnelTarget:
    return TunnelTarget(host, port, client, "localhost")


async def test_an_unreachable_tunnel_is_relocated_and_later_connections_go_there(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tunnel: int
) -> None:
    dead = _target(_closed_port(), contexts[1])
    moved = _target(tunnel, contexts[1])
    asked: list[int] = []

    def relocate() -> TunnelTarget | None:
        asked.append(1)
        return moved

    forwarder = Forwarder(dead, relocate=relocate)
    used, _reader, writer = await forwarder._open_or_fail_over(forwarder.target)
    writer.close()
    assert used is moved and forwarder.target is moved
    used, _reader, writer = await forwarder._open_or_fail_over(forwarder.target)
    writer.close()
    assert used is moved
    assert asked == [1]  # the second connection went there without asking


async def test_a_relocation_to_the_same_address_or_nowhere_is_the_original_error(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    dead = _target(_closed_port(), contexts[1])
    for answer in (_target(dead.port, contexts[1]), None):
        forwarder = Forwarder(dead, relocate=lambda answer=answer: answer)
        with pytest.raises(ConnectionRefusedError):
            await forwarder._open_or_fail_over(dead)
        assert forwarder.target is dead
    with pytest.raises(ConnectionRefusedError):
        await Forwarder(dead)._open_or_fail_over(dead)


async def test_a_tunnel_that_refuses_tls_is_not_relocated(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tunnel: int
) -> None:
    """Reached, but not a tunnel this CA speaks for: the refusal stands (the
    gateway answering would send the CLI back to the same place)."""

    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    asked: list[int] = []

    def relocate() -> TunnelTarget | None:
        asked.append(1)
        return _target(tunnel, contexts[1])

    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    async with server:
        plain = _target(server.sockets[0].getsockname()[1], contexts[1])
        forwarder = Forwarder(plain, relocate=relocate)
        with pytest.raises(ssl.SSLError):
            await forwarder._open_or_fail_over(plain)
    assert asked == [] and forwarder.target is plain


def test_the_tunnel_follows_the_gateway_the_heartbeats_reach(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """Heartbeats failed over to B: new connections go to B's tunnel too (asked
    once), so the two never hold the grant at two gateways; while they stay on
    A, or the tunnel was set by hand (no API named), nothing is asked."""
    at_a = TunnelTarget("127.0.0.1", 7001, contexts[1], "localhost", api_url="https://a:7745")
    at_b = TunnelTarget("127.0.0.1", 7002, contexts[1], "localhost", api_url="https://b:7745")
    asked: list[int] = []

    def relocate() -> TunnelTarget | None:
        asked.append(1)
        return at_b

    forwarder = Forwarder(at_a, relocate=relocate)
    forwarder.follow("https://a:7745")
    assert forwarder.target is at_a and asked == []
    forwarder.follow("https://b:7745")
    assert forwarder.target is at_b and asked == [1]
    forwarder.follow("https://b:7745")
    assert asked == [1]
    by_hand = Forwarder(_target(7003, contexts[1]), relocate=relocate)
    by_hand.follow("https://b:7745")
    assert asked == [1] and by_hand.target.port == 7003


def test_a_renewed_certificate_keeps_the_tunnel_and_its_gateway(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    box = SecretBox(bytes(range(32)))
    (tmp_path / "ca").mkdir()
    ca = pki.ensure_pki(tmp_path / "ca", box, ())
    key = pki.new_key()
    cert = ca.sign_grant_csr(
        pki.csr_for(key), "s-1", dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    )
    at_b = TunnelTarget("127.0.0.1", 7002, contexts[1], "localhost", api_url="https://b:7745")
    forwarder = Forwarder(at_b, key=key, ca_pem=ca.ca_pem)
    forwarder.renew(cert.decode())
    assert (forwarder.target.address, forwarder.target.api_url) == (at_b.address, at_b.api_url)
    assert forwarder.target.tls is not at_b.tls
