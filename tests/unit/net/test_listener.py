"""The listener's last line of defence: a bug while setting up a connection reaches
the client as an ErrorResponse with SQLSTATE XX000, not as a closed socket.

No PostgreSQL is involved: the failure happens before the upstream is contacted,
and the client is asyncpg, which keeps the SQLSTATE of a refused login.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.net.listener import AccessListener, GrantInfo


class BrokenHost:
    """A service whose upstream lookup has a bug."""

    startup_timeout = 10.0
    connect_timeout = 10.0
    client_tls = None
    metrics = None

    def __init__(self) -> None:
        #: refusals handed to the refusal recorder
        self.refused_calls: list[Any] = []
        self.records: list[tuple[str, Any]] = []

    async def upstream_target(self, resource: str, account: str, **_: Any) -> Any:
        raise RuntimeError("a bug in the lookup")

    def connection_audit(self, *args: Any) -> None:
        return None

    def refused(self, refusal: Any) -> None:
        self.refused_calls.append(refusal)

    def refusal(self) -> None:
        return None

    def scram_cache(self, target: Any) -> dict[Any, Any]:
        return {}

    async def record_connection_start(self, *args: Any, **kwargs: Any) -> str:
        self.records.append(("start", kwargs))
        return "c" * 32

    async def record_connection_end(self, connection_id: str, **kwargs: Any) -> None:
        self.records.append(("end", kwargs))


@pytest.mark.asyncio
async def test_an_internal_error_during_set_up_is_an_xx000_error_response() -> None:
    grant = GrantInfo(
        session_id="s" * 32,
        resource="prod",
        account="ro",
        username="app",
        database="appdb",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    listener = AccessListener(grant, BrokenHost())  # type: ignore[arg-type]
    port = await listener.start()
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await asyncpg.connect(
                host="127.0.0.1", port=port, user="app", database="appdb", ssl=False, timeout=30
            )
        assert refused.value.sqlstate == "XX000"
        assert refused.value.message == (
            "pam could not set up this connection because of an internal error"
        )
        assert refused.value.hint == "the gateway's log has the details"
        # The bug's text is for the log, not for the client.
        assert "a bug in the lookup" not in str(refused.value)
    finally:
        await listener.close()
