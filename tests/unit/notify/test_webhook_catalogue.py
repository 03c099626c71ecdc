"""The event catalogue, subscriptions, the access events' data and webhook URLs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.errors import InvalidRequest
from gateway.notify.events import (
    ALL_EVENTS,
    EVENTS,
    Event,
    check_events,
    is_subscribed,
    iso_time,
    session_data,
)
from gateway.notify.webhooks import check_url

T0 = datetime(2026, 12, 7, 10, 15, 0, 123456, tzinfo=UTC)


def test_the_catalogue_is_the_documented_list() -> None:
    assert sorted(EVENTS) == [
        "access.break_glass",
        "access.ended",
        "access.extended",
        "access.opened",
        "access.revoked",
        "request.approved",
        "request.cancelled",
        "request.created",
        "request.denied",
        "request.expired",
        "rotation.failed",
        "rotation.succeeded",
        "webhook.test",
    ]


def test_the_docs_describe_every_event(pytestconfig: pytest.Config) -> None:
    doc = (pytestconfig.rootpath / "docs" / "webhooks.md").read_text()
    assert [e.value for e in Event if f"`{e.value}`" not in doc] == []


def test_a_subscription_is_sorted_and_deduplicated_and_star_stands_alone() -> None:
    assert check_events(["access.revoked", "access.opened", "access.opened"]) == (
        "access.opened",
        "access.revoked",
    )
    assert check_events(["*"]) == ("*",)
    with pytest.raises(InvalidRequest, match="give it alone"):
        check_events(["*", "access.opened"])
    with pytest.raises(InvalidRequest, match="at least one event"):
        check_events([])


def test_an_unknown_event_is_refused_naming_the_catalogue() -> None:
    with pytest.raises(InvalidRequest, match=r"unknown webhook event 'access\.open'") as refused:
        check_events(["access.opened", "access.open"])
    assert refused.value.hint is not None and "access.opened" in refused.value.hint


def test_subscriptions_match_named_events_star_matches_all_but_the_test_event() -> None:
    assert is_subscribed(("access.opened",), "access.opened")
    assert not is_subscribed(("access.opened",), "access.ended")
    assert is_subscribed((ALL_EVENTS,), "request.created")
    # webhook.test goes to the one webhook asked for, never by subscription.
    assert not is_subscribed((ALL_EVENTS,), "webhook.test")
    assert not is_subscribed(("webhook.test",), "webhook.test")


def test_times_are_utc_with_microseconds_and_z() -> None:
    assert iso_time(T0) == "2026-12-07T10:15:00.123456Z"
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    assert iso_time(plus_two) == "2026-12-07T10:15:00.123456Z"


@dataclass
class _Session:
    id: str = "a" * 32
    requester: str = "ann"
    resource_name: str = "prod"
    account_name: str = "ro"
    reason: str | None = "INC-7"
    started_at: datetime = T0
    expires_at: datetime = T0 + timedelta(hours=1)
    ended_at: datetime | None = None
    end_reason: str | None = None
    end_detail: str | None = None


def test_an_open_session_s_data_names_who_what_why_and_until_when() -> None:
    assert session_data(_Session()) == {
        "session_id": "a" * 32,
        "requester": "ann",
        "resource": "prod",
        "account": "ro",
        "reason": "INC-7",
        "started_at": "2026-12-07T10:15:00.123456Z",
        "expires_at": "2026-12-07T11:15:00.123456Z",
    }


def test_an_ended_session_s_data_also_says_how_it_ended() -> None:
    ended = _Session(
        ended_at=T0 + timedelta(minutes=5), end_reason="revoked", end_detail="revoked by bob"
    )
    data = session_data(ended)
    assert (data["ended_at"], data["end_reason"], data["end_detail"]) == (
        "2026-12-07T10:20:00.123456Z",
        "revoked",
        "revoked by bob",
    )


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/pam", "http://127.0.0.1:8080/x?y=1", "HTTPS://h/"]
)
def test_http_and_https_urls_with_a_host_are_accepted(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/x", "starts with https:// or http://"),
        ("hooks.example.com/pam", "starts with https:// or http://"),
        ("file:///etc/passwd", "starts with https:// or http://"),
        ("https:///path", "names a host"),
        ("https://user:pw@h/x", "no user name or password"),
        ("https://h/x y", "no spaces or control characters"),
        ("https://h/\x1b[2J", "no spaces or control characters"),
        ("https://h:99999/", "not a URL"),
        ("https://h/" + "x" * 2048, "at most 2048 characters"),
    ],
)
def test_other_urls_are_refused_saying_why(url: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        check_url(url)
