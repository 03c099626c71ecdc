"""Rotation schedules in the store, on a SQLite file and a real PostgreSQL: set and
turned off on the account, due accounts found in order, and the scheduler's
compare-and-set moves of a due time that lose to a schedule set meanwhile."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from store_support import T0, FakeClock

from gateway.credentials.secretbox import SecretBox
from gateway.errors import InvalidRequest, NotFound
from gateway.store import Store

HOUR = 3600


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    with Store.open(store_url, SecretBox(secrets.token_bytes(32)), clock=clock) as opened:
        opened.add_resource("prod", "db.example.com", 5432, "app")
        for account in ("ro", "rw", "admin"):
            opened.add_account("prod", account, f"app_{account}", "pw-" + secrets.token_hex(8))
        yield opened


def at(seconds: float) -> object:
    return T0 + timedelta(seconds=seconds)


def test_a_schedule_is_set_on_the_account_and_turned_off(store: Store) -> None:
    account = store.set_rotation_schedule("prod", "ro", HOUR, at(HOUR))
    assert (account.rotation_interval_seconds, account.next_rotation_at) == (HOUR, at(HOUR))
    listed = {a.name: a for a in store.list_accounts("prod")}
    assert listed["ro"].next_rotation_at == at(HOUR)
    assert listed["rw"].rotation_interval_seconds is None
    off = store.set_rotation_schedule("prod", "ro", None)
    assert (off.rotation_interval_seconds, off.next_rotation_at, off.rotation_failures) == (
        None,
        None,
        0,
    )
    assert store.due_rotations(at(10 * HOUR)) == []


def test_a_schedule_needs_a_positive_interval_a_first_time_and_an_account(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="positive"):
        store.set_rotation_schedule("prod", "ro", 0, at(1))
    with pytest.raises(InvalidRequest, match="first time"):
        store.set_rotation_schedule("prod", "ro", HOUR)
    with pytest.raises(NotFound, match="account 'nope'"):
        store.set_rotation_schedule("prod", "nope", HOUR, at(1))


def test_due_accounts_come_longest_overdue_first(store: Store) -> None:
    store.set_rotation_schedule("prod", "ro", HOUR, at(30))
    store.set_rotation_schedule("prod", "rw", HOUR, at(10))
    store.set_rotation_schedule("prod", "admin", HOUR, at(100))
    due = store.due_rotations(at(30))
    assert [(d.account, d.next_at, d.interval_seconds, d.failures) for d in due] == [
        ("rw", at(10), HOUR, 0),
        ("ro", at(30), HOUR, 0),
    ]
    assert [d.account for d in store.due_rotations(at(30), limit=1)] == ["rw"]


def test_a_due_time_moves_only_over_the_one_read(store: Store) -> None:
    store.set_rotation_schedule("prod", "ro", HOUR, at(10))
    assert store.claim_rotation("prod", "ro", expected_next_at=at(10), next_at=at(70))
    # A second claim of the same due time (another gateway) gets nothing.
    assert not store.claim_rotation("prod", "ro", expected_next_at=at(10), next_at=at(70))
    assert store.reschedule_rotation(
        "prod", "ro", expected_next_at=at(70), next_at=at(200), failures=2
    )
    account = store.get_account("prod", "ro")
    assert (account.next_rotation_at, account.rotation_failures) == (at(200), 2)


def test_a_schedule_set_during_a_run_wins_over_the_run(store: Store) -> None:
    store.set_rotation_schedule("prod", "ro", HOUR, at(10))
    assert store.claim_rotation("prod", "ro", expected_next_at=at(10), next_at=at(70))
    store.set_rotation_schedule("prod", "ro", 2 * HOUR, at(2 * HOUR))  # an admin, meanwhile
    assert not store.reschedule_rotation(
        "prod", "ro", expected_next_at=at(70), next_at=at(HOUR), failures=0
    )
    assert store.get_account("prod", "ro").next_rotation_at == at(2 * HOUR)
    store.set_rotation_schedule("prod", "ro", None)  # turned off meanwhile: stays off
    assert not store.claim_rotation("prod", "ro", expected_next_at=at(2 * HOUR), next_at=at(1))
    assert store.get_account("prod", "ro").next_rotation_at is None


def test_an_ephemeral_account_has_no_schedule(store: Store) -> None:
    store.add_ephemeral_account("prod", "per-grant", "app_template", None)
    with pytest.raises(InvalidRequest, match="is ephemeral: it has no password to rotate"):
        store.set_rotation_schedule("prod", "per-grant", 3600, at(60))  # type: ignore[arg-type]
    store.set_rotation_schedule("prod", "per-grant", None)
