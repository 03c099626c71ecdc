"""What a running `pam db access` shows (cli.live) and `pam grant extend`, in-process.

The expiry events' schedule, the JSON lines for scripts and the extend
command's wiring and errors; tests/integration/test_live_control.py runs them
against a real daemon, a terminal included.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest
from click.testing import CliRunner

from cli.access import ConnectionInfo
from cli.client import ApiClient, SessionJson
from cli.live import ExpiryWatch, JsonEvents, in_words
from cli.main import cli
from gateway.config import ClientConfig
from gateway.durations import format_duration

T0 = datetime(2024, 6, 1, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_each_expiry_event_is_due_once_longest_first() -> None:
    watch = ExpiryWatch([60, 300], expiry=at(3600), now=T0)
    assert watch.due(at(3299)) == []
    assert watch.due(at(3300)) == [300]
    assert watch.due(at(3400)) == []
    assert watch.due(at(3540)) == [60]
    assert watch.due(at(3599)) == []


def test_a_lead_already_past_when_the_grant_opened_is_not_owed() -> None:
    watch = ExpiryWatch([300, 60], expiry=at(120), now=T0)
    assert watch.due(at(119)) == [60]


def test_an_extension_owes_the_events_again_before_the_new_expiry() -> None:
    watch = ExpiryWatch([300, 60], expiry=at(600), now=T0)
    assert watch.due(at(300)) == [300]
    watch.reset(at(600 + 1800), now=at(310))
    assert watch.due(at(2100)) == [300]
    assert watch.due(at(2340)) == [60]


def test_a_suspended_cli_catches_up_with_every_event_due() -> None:
    watch = ExpiryWatch([300, 60], expiry=at(600), now=T0)
    assert watch.due(at(590)) == [300, 60]


def test_durations_read_as_the_gateway_and_the_options_say_them() -> None:
    assert [in_words(s) for s in (300, 60, 90, 1, 8)] == [
        "5 minutes",
        "1 minute",
        "90 seconds",
        "1 second",
        "8 seconds",
    ]
    assert [format_duration(s) for s in (1800, 5400, 90, 45)] == ["30m", "1h30m", "1m30s", "45s"]


SESSION = cast(
    SessionJson,
    {
        "id": "3c57aa" + "0" * 26,
        "resource_name": "prod",
        "account_name": "app",
        "listen_host": "127.0.0.1",
        "listen_port": 5433,
        "expires_at": "2024-06-01T11:00:00+00:00",
        "ended_at": "2024-06-01T10:20:00+00:00",
        "end_reason": "revoked",
        "end_detail": "revoked by ann: INC-7",
    },
)


def test_json_events_are_one_flushed_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    events = JsonEvents()
    info = ConnectionInfo(url="postgresql://u@127.0.0.1:5433/db", psql="psql x", jdbc="jdbc:y")
    events.granted(SESSION, info)
    events.expiring(SESSION, 300)
    later = cast(SessionJson, {**SESSION, "expires_at": "2024-06-01T11:30:00+00:00"})
    events.extended(later, SESSION["expires_at"])
    events.warn("not extended: refused", "ask")
    events.ended_by_gateway(SESSION)
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    for line in lines:
        assert line.pop("at")
        assert line.pop("session_id") == SESSION["id"]
    assert lines == [
        {
            "event": "granted",
            "resource": "prod",
            "account": "app",
            "expires_at": "2024-06-01T11:00:00+00:00",
            "listen_host": "127.0.0.1",
            "listen_port": 5433,
            "url": info.url,
            "psql": info.psql,
            "jdbc": info.jdbc,
        },
        {"event": "expiring", "expires_at": "2024-06-01T11:00:00+00:00", "in_seconds": 300},
        {
            "event": "extended",
            "expires_at": "2024-06-01T11:30:00+00:00",
            "previous_expires_at": "2024-06-01T11:00:00+00:00",
        },
        {
            "event": "ended",
            "reason": "revoked",
            "detail": "revoked by ann: INC-7",
            "ended_at": "2024-06-01T10:20:00+00:00",
            "expires_at": "2024-06-01T11:00:00+00:00",
        },
    ]
    assert err == "warning: not extended: refused (hint: ask)\n"


def run_extend(*args: str, status: int = 200, body: Any = None) -> tuple[Any, list[Any]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    def factory() -> ApiClient:
        config = ClientConfig(api_url="http://pam.test:7745", token="t0ken")
        return ApiClient(config, transport=httpx.MockTransport(answer))

    result = CliRunner().invoke(cli, ["grant", "extend", *args], obj=factory, prog_name="pam")
    return result, seen


def test_grant_extend_posts_the_seconds_and_says_the_new_expiry() -> None:
    result, seen = run_extend("3c57aa", "--by", "1h30m", body=SESSION)
    assert result.exit_code == 0, result.output
    assert (seen[0].method, seen[0].url.path) == ("POST", "/v1/access/3c57aa/extend")
    assert json.loads(seen[0].content) == {"by_seconds": 5400}
    assert result.output.startswith("Extended session 3c57aa00: it now expires ")


def test_grant_extend_errors_are_one_line() -> None:
    result, seen = run_extend("3c57aa", "--by", "soon")
    assert (result.exit_code, seen) == (2, [])
    assert result.output == (
        "error: Invalid value: 'soon' is not a duration like 1h, 30m, 1h30m or 90s\n"
    )
    refused = {
        "error": {
            "type": "invalid_request",
            "message": "extending this grant needs approval",
            "hint": "ask",
        }
    }
    result, _ = run_extend("3c57aa", "--by", "30m", status=400, body=refused)
    assert (result.exit_code, result.output) == (
        1,
        "error: extending this grant needs approval (hint: ask)\n",
    )
