"""Crash recovery on a store shared by several gateways (``close_orphans``), on
a SQLite file and a real PostgreSQL: a gateway ends only the open sessions of
gateways whose presence lease has lapsed (and its own, left by its previous run,
at its start), each at that gateway's last lease renewal, and two gateways
recovering at once end each session once."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest
from store_support import (
    PRESENCE_LEASE_SECONDS,
    FakeClock,
    open_session,
    renew_presence,
    store_with_db1,
)

from gateway.credentials.schedule import presence_lease
from gateway.credentials.secretbox import SecretBox
from gateway.store import Store
from gateway.store.models import AccessSession

KEY = secrets.token_bytes(32)
LEASE = PRESENCE_LEASE_SECONDS


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with store_with_db1(store_url, KEY, clock) as opened:
        yield opened


def _connect(store: Store, session: AccessSession) -> str:
    return store.create_connection(session.id, client_addr="10.0.0.7:5000").id


def test_a_session_records_the_gateway_that_opened_it_under_its_seal(store: Store) -> None:
    session = open_session(store, "gw-a")
    assert store.get_session(session.id).gateway_id == "gw-a"
    store.end_session(session.id, reason="client_ended")
    assert store.verify_audit(session.id) == []


def test_recovery_leaves_a_live_gateways_sessions_alone(store: Store, clock: FakeClock) -> None:
    renew_presence(store, "gw-a")
    renew_presence(store, "gw-b")
    session = open_session(store, "gw-a")
    connection = _connect(store, session)
    clock.advance(LEASE - 1)  # gw-a's lease has a second left
    assert store.close_orphans("gw-b") == 0
    assert store.close_orphans("gw-b", starting=True) == 0  # a start concerns its own only
    assert store.get_session(session.id).ended_at is None
    [row] = store.list_connections(session.id)
    assert (row.id, row.ended_at) == (connection, None)


def test_a_running_gateway_never_ends_its_own_sessions_even_with_its_lease_lapsed(
    store: Store, clock: FakeClock
) -> None:
    # A renewal that stalled past the lease (the store out of reach) leaves the
    # caller's own row expired; it is alive all the same: others may take it
    # as gone, it never ends its own live sessions.
    renew_presence(store, "gw-a")
    session = open_session(store, "gw-a")
    clock.advance(LEASE + 5)
    assert store.close_orphans("gw-a") == 0
    assert store.get_session(session.id).ended_at is None
    assert store.close_orphans("gw-b") == 1  # another gateway takes gw-a as gone


def test_a_lapsed_gateways_sessions_end_at_its_last_renewal(store: Store, clock: FakeClock) -> None:
    renew_presence(store, "gw-a")
    before = open_session(store, "gw-a")
    connection = _connect(store, before)
    clock.advance(4)
    renew_presence(store, "gw-a")  # its last renewal
    last_renewal = clock.now
    clock.advance(2)
    after = open_session(store, "gw-a")  # opened after that renewal, then gw-a died
    renew_presence(store, "gw-b")
    live = open_session(store, "gw-b")
    clock.advance(LEASE - 3)
    assert store.close_orphans("gw-b") == 0  # gw-a's lease has a second left
    clock.advance(1)  # it ends now: lapsed
    renew_presence(store, "gw-b")
    assert store.close_orphans("gw-b") == 2
    ended = store.get_session(before.id)
    assert (ended.end_reason, ended.ended_at) == ("gateway_crash", last_renewal)
    # Not before it started.
    assert store.get_session(after.id).ended_at == after.started_at
    [row] = store.list_connections(before.id)
    assert (row.id, row.end_reason, row.ended_at) == (connection, "gateway_crash", last_renewal)
    assert store.get_session(live.id).ended_at is None
    assert store.verify_audit() == []
    assert store.close_orphans("gw-b") == 0


def test_a_gateway_starting_ends_its_own_previous_runs_sessions(
    store: Store, clock: FakeClock
) -> None:
    renew_presence(store, "gw-a")
    last_renewal = clock.now
    session = open_session(store, "gw-a")
    clock.advance(3)  # killed, and started again within its lease's length
    assert store.close_orphans("gw-a") == 0  # a tick of its own: its sessions are live
    assert store.close_orphans("gw-a", starting=True) == 1
    assert store.get_session(session.id).ended_at == max(last_renewal, session.started_at)


def test_sessions_of_no_gateway_or_of_one_without_a_lease_end_now(
    store: Store, clock: FakeClock
) -> None:
    old = open_session(store, None)  # from before revision 0017
    unknown = open_session(store, "gw-never-seen")
    renew_presence(store, "gw-released")
    released = open_session(store, "gw-released")
    store.release_lease(presence_lease("gw-released"), "gw-released")
    clock.advance(60)
    assert store.close_orphans("gw-b") == 3
    for session in (old, unknown, released):
        assert store.get_session(session.id).ended_at == clock.now


def test_two_gateways_recovering_at_once_end_each_session_once(
    store_url: str, store: Store, clock: FakeClock
) -> None:
    renew_presence(store, "gw-a")
    last_renewal = clock.now
    orphans = [open_session(store, "gw-a") for _ in range(20)]
    for session in orphans[::2]:
        _connect(store, session)
    clock.advance(LEASE + 1)
    others = [Store.open(store_url, SecretBox(KEY), clock=clock) for _ in range(4)]
    start = threading.Barrier(len(others))
    counts: list[int] = []

    def recover(i: int, one: Store) -> None:
        one.acquire_lease(presence_lease(f"gw-{i}"), f"gw-{i}", LEASE)
        start.wait()
        counts.append(one.close_orphans(f"gw-{i}"))

    try:
        threads = [threading.Thread(target=recover, args=(i, one)) for i, one in enumerate(others)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for one in others:
            one.close()
    assert sorted(counts)[-1] >= 1 and sum(counts) == len(orphans)
    for session in orphans:
        ended = store.get_session(session.id)
        assert (ended.end_reason, ended.ended_at) == ("gateway_crash", last_renewal)
    assert store.verify_audit() == []
