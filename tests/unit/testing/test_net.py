"""free_port: under pytest-xdist, each worker's ports come from a block of its
own, below the kernel's ephemeral range; elsewhere the kernel picks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.testing import net
from gateway.testing.net import XDIST_WORKER_ENV, free_port

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _binds(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((net.LOOPBACK_HOST, port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize(("worker", "start"), [("gw0", 20000), ("gw3", 21500), ("gw24", 32000)])
def test_an_xdist_worker_gets_a_free_port_of_its_own_block(
    monkeypatch: pytest.MonkeyPatch, worker: str, start: int
) -> None:
    monkeypatch.setenv(XDIST_WORKER_ENV, worker)
    ports = {free_port() for _ in range(20)}
    assert all(start <= port < start + 500 for port in ports), ports
    assert all(_binds(port) for port in ports)


def test_a_taken_port_of_the_block_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(XDIST_WORKER_ENV, "gw1")
    held = next(port for port in range(20500, 21000) if _binds(port))
    with socket.socket() as holder:
        holder.bind((net.LOOPBACK_HOST, held))
        holder.listen()
        # The held port is the first one tried: free_port must move past it.
        monkeypatch.setitem(net._block_orders, range(20500, 21000), iter(range(held, held + 50)))
        port = free_port()
    assert held < port < held + 50
    assert _binds(port)


def test_a_worker_is_not_handed_the_same_port_twice_within_its_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two ports given out before either is bound (two daemons' API ports between
    # `gateway init` and `gateway run`) must differ.
    monkeypatch.setenv(XDIST_WORKER_ENV, "gw2")
    monkeypatch.setattr(net, "_block_orders", {})  # a first pass through the block
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(21000 <= port < 21500 for port in ports)


def test_blocks_that_reach_into_the_hosts_ephemeral_range_are_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("21000\t60999\n")
    monkeypatch.setattr(net, "_EPHEMERAL_PORT_RANGE", ephemeral)
    monkeypatch.setenv(XDIST_WORKER_ENV, "gw1")
    assert 20500 <= free_port() < 21000
    monkeypatch.setenv(XDIST_WORKER_ENV, "gw2")
    assert not 21000 <= free_port() < 21500


@pytest.mark.parametrize("worker", [None, "gw25", "master", "gwx"])
def test_outside_a_worker_block_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch, worker: str | None
) -> None:
    if worker is None:
        monkeypatch.delenv(XDIST_WORKER_ENV, raising=False)
    else:
        monkeypatch.setenv(XDIST_WORKER_ENV, worker)
    low, high = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
    port = free_port()
    assert low <= port <= high
    assert _binds(port)
