"""A real daemon's log with ``--log-format json`` (issue 17, point 5): after a
grant, a relayed connection, a refused one and an ordered stop, every line the
daemon and its audit writer process wrote is one JSON object with the stable
keys (docs/operations.md, "Log lines")."""

from __future__ import annotations

import json
import re

import psycopg
import pytest
from harness import Gateway, connect_error

from gateway.app.logging import STABLE_KEYS

pytestmark = pytest.mark.integration

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
#: the keys docs/operations.md promises on every line (not read from the code,
#: so that a key dropped there fails here)
DOCUMENTED_KEYS = {"timestamp", "level", "event", "logger"}


def test_every_line_of_the_daemons_log_is_json_with_the_stable_keys(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert connect_error(access.port, access.user, "not_the_database").sqlstate == "3D000"
    access.stop()
    assert gateway.stop() == 0
    lines = [line for line in gateway.log().splitlines() if line.strip()]
    assert lines
    events = []
    for line in lines:
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert DOCUMENTED_KEYS.issubset(event), line
        assert ISO_UTC.match(event["timestamp"]), line
        assert event["level"] in LEVELS, line
        events.append(event)
    assert any(e["logger"].startswith("gateway.") for e in events)
    assert set(STABLE_KEYS) == DOCUMENTED_KEYS
