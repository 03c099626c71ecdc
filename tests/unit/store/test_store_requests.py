"""Access requests and the access trail in the store, on a SQLite file and a
real PostgreSQL: round trips, compare-and-set, deadlines, and verification of
the trail's chain and sealed head against edits, removals and truncation."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, text
from store_support import T0, FakeClock, pg_admin_url

from gateway.access.requests import (
    Actor,
    Approve,
    Cancel,
    Open,
    RequestState,
    apply,
    new_request,
)
from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.store import Store

ALICE = Actor("a" * 32, "alice")
BOB = Actor("b" * 32, "bob", may_approve=True)
CAROL = Actor("c" * 32, "carol", may_approve=True)


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        yield opened


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_admin_url(store_url) if "postgresql" in store_url else store_url)
    yield engine
    engine.dispose()


def ask(store: Store, request_id: str, approvals: int = 1, **kwargs: object) -> str:
    request, changes = new_request(
        id=request_id,
        project="default",
        requester=ALICE,
        resource="prod",
        account="ro",
        duration_seconds=1800,
        reason="INC-7 ü",
        policy_name="gated",
        approvals_required=approvals,
        approvers=("@leads", "bob"),
        now=T0,
        **kwargs,  # type: ignore[arg-type]
    )
    store.create_request(request, changes)
    return request.id


def decide(store: Store, request_id: str, action: object, minutes: int = 1) -> None:
    before = store.get_request(request_id)
    after, change = apply(before, action, T0 + timedelta(minutes=minutes))  # type: ignore[arg-type]
    store.save_transition(after, change, expected_version=before.version)


def test_a_request_round_trips_with_its_approvals(store: Store) -> None:
    rid = ask(store, "1" * 32, approvals=2)
    decide(store, rid, Approve(BOB, "fine"))
    got = store.get_request(rid[:8])
    assert (got.state, got.reason, got.approvers) == (
        RequestState.PENDING,
        "INC-7 ü",
        ("@leads", "bob"),
    )
    assert [(a.by, a.comment, a.at) for a in got.approvals] == [
        ("bob", "fine", T0 + timedelta(minutes=1))
    ]
    decide(store, rid, Approve(CAROL), minutes=2)
    got = store.get_request(rid)
    assert got.state is RequestState.APPROVED
    assert got.use_by == T0 + timedelta(minutes=17)
    assert [r.kind for r in store.access_trail(request_id=rid)] == [
        "requested",
        "approved",
        "approved",
    ]
    assert store.verify_access_trail() == []


def test_a_transition_over_a_stale_version_writes_nothing(store: Store) -> None:
    rid = ask(store, "2" * 32)
    stale = store.get_request(rid)
    decide(store, rid, Cancel(ALICE))
    after, change = apply(stale, Approve(BOB), T0)
    with pytest.raises(InvalidRequest, match="changed while this was decided"):
        store.save_transition(after, change, expected_version=stale.version)
    assert store.get_request(rid).state is RequestState.CANCELLED
    assert [r.kind for r in store.access_trail(request_id=rid)] == ["requested", "cancelled"]
    assert store.verify_access_trail() == []


def test_unknown_and_ambiguous_ids(store: Store) -> None:
    ask(store, "3" * 31 + "a")
    ask(store, "3" * 31 + "b")
    with pytest.raises(NotFound, match="request '444444' not found"):
        store.get_request("444444")
    with pytest.raises(InvalidRequest, match="matches more than one request"):
        store.get_request("333333")


def test_due_requests_are_pending_past_deadline_and_approved_unopened(store: Store) -> None:
    waiting = ask(store, "5" * 32)
    approved = ask(store, "6" * 32)
    decide(store, approved, Approve(BOB))
    opened = ask(store, "7" * 32)
    decide(store, opened, Approve(BOB))
    decide(store, opened, Open(ALICE, "s" * 32), minutes=2)
    assert store.due_requests(T0 + timedelta(minutes=15)) == []
    assert {r.id for r in store.due_requests(T0 + timedelta(minutes=16))} == {approved}
    assert {r.id for r in store.due_requests(T0 + timedelta(hours=1))} == {waiting, approved}


def test_concurrent_appends_chain_one_after_another(store: Store) -> None:
    ids = [f"{i:032x}" for i in range(1, 21)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda rid: ask(store, rid), ids))
    trail = store.access_trail()
    assert [r.seq for r in trail] == list(range(1, 21))
    assert store.verify_access_trail() == []


def _trail(store: Store) -> None:
    rid = ask(store, "8" * 32)
    decide(store, rid, Approve(BOB))
    decide(store, rid, Open(ALICE, "s" * 32), minutes=2)
    assert store.verify_access_trail() == []


def test_verify_names_an_edited_record(store: Store, raw: Engine) -> None:
    _trail(store)
    with raw.begin() as conn:
        conn.execute(text("UPDATE access_events SET actor = 'mallory' WHERE seq = 2"))
    problems = store.verify_access_trail()
    assert [(p.session_id, p.seq, p.problem) for p in problems] == [("access-trail", 2, "changed")]
    assert problems[0].detail == "seq 2 (approved of request 88888888) was edited"


def test_verify_names_a_removed_record(store: Store, raw: Engine) -> None:
    _trail(store)
    with raw.begin() as conn:
        conn.execute(text("DELETE FROM access_events WHERE seq = 2"))
    assert [(p.seq, p.problem) for p in store.verify_access_trail()] == [
        (2, "removed"),
        (3, "reordered"),
    ]


def test_verify_sees_records_cut_off_the_end(store: Store, raw: Engine) -> None:
    _trail(store)
    with raw.begin() as conn:
        conn.execute(text("DELETE FROM access_events WHERE seq = 3"))
    problems = store.verify_access_trail()
    assert [(p.seq, p.problem, p.detail) for p in problems] == [
        (3, "truncated", "records 3..3 were cut off the end")
    ]


def test_verify_sees_an_edited_or_removed_head(store: Store, raw: Engine) -> None:
    _trail(store)
    with raw.begin() as conn:
        conn.execute(text("UPDATE access_event_head SET count = 2"))
    assert [p.problem for p in store.verify_access_trail()] == ["seal"]
    with raw.begin() as conn:
        conn.execute(text("DELETE FROM access_event_head"))
    assert [p.detail for p in store.verify_access_trail()] == [
        "the access trail's sealed head was removed"
    ]


def test_an_extension_request_round_trips(store: Store) -> None:
    rid = ask(store, "9" * 32, extends_session="e" * 32)
    got = store.get_request(rid)
    assert (got.extends, got.session_id) == (True, "e" * 32)
    assert store.access_trail(request_id=rid)[0].detail["extends_session"] == "e" * 32
