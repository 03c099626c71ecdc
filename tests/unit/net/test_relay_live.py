"""Playbook tests of the relay's live control: the gateway's own notices, sent
only between server messages, and the idle limit, which never cuts a query in
flight. Time is the loop's virtual clock (see ``playbook.py``), so "idle for
15 minutes" passes exactly and at once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from playbook import Playbook, message, virtual_time
from relay_script import QUERY, SERVER_STREAM, SYNC, client_leaves, started

from gateway.net.connection import idle_limit
from gateway.net.ports import GrantInfo
from gateway.protocol import messages
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

NOTICE = messages.notice_response("WARNING", SqlState.WARNING, "the grant expires soon")
LIMIT = 900.0
GREETING = messages.authentication_ok() + messages.ready_for_query()


def grant(idle: float | None = LIMIT, policy: str | None = "ops") -> GrantInfo:
    return GrantInfo(
        session_id="s" * 32,
        resource="prod",
        account="app",
        username="app",
        database="appdb",
        expires_at=datetime(2100, 1, 1, tzinfo=UTC),
        idle_timeout_seconds=idle,
        idle_policy=policy,
    )


IDLE = idle_limit(grant())


def now() -> float:
    return asyncio.get_running_loop().time()


# --- notices ---------------------------------------------------------------------------


@virtual_time
async def test_a_notice_goes_out_at_once_between_server_messages() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM)
    pb.relay.notify(NOTICE)
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM + NOTICE
    assert pb.relay.bytes_from_server == len(SERVER_STREAM)  # the gateway's own bytes
    await client_leaves(pb)
    assert pb.relay.fatal_sqlstate is None  # a notice is not an error sent


@virtual_time
async def test_a_notice_waits_for_the_end_of_the_server_message_it_would_split() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM[:20])  # stops inside a message
    pb.relay.notify(NOTICE)
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM[:20]
    pb.server.send(SERVER_STREAM[20:])
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM + NOTICE
    await client_leaves(pb)


@virtual_time
async def test_no_notice_follows_a_fatal() -> None:
    pb = await started()
    pb.relay.terminate(IDLE.termination)
    pb.relay.notify(NOTICE)
    assert await pb.ended() == ConnectionEndReason.IDLE_TIMEOUT
    assert bytes(pb.client.written) == IDLE.termination.error_response()


# --- the idle limit --------------------------------------------------------------------


def test_the_idle_fatal_names_the_limit_and_the_policy_with_postgres_own_code() -> None:
    assert IDLE.seconds == LIMIT
    termination = IDLE.termination
    assert (termination.reason, termination.sqlstate) == ("idle_timeout", "57P05")
    assert termination.message == "terminating connection: idle for 15m (the limit of policy 'ops')"
    assert idle_limit(grant(idle=None)) is None


@virtual_time
async def test_a_silent_connection_is_cut_once_the_limit_has_passed() -> None:
    pb = await started(idle=IDLE)
    began = now()
    assert await pb.ended() == ConnectionEndReason.IDLE_TIMEOUT
    assert now() - began == LIMIT
    assert bytes(pb.client.written) == IDLE.termination.error_response()
    assert pb.relay.fatal_sqlstate == IDLE.termination.sqlstate
    assert bytes(pb.server.written) == messages.terminate()


@virtual_time
async def test_traffic_either_way_postpones_the_cut() -> None:
    pb = await started(idle=IDLE)
    began = now()
    await asyncio.sleep(600)
    pb.server.send(message("A", b"\x00\x00\x00\x2a" + b"jobs\x00ready\x00"))  # a NOTIFY
    await asyncio.sleep(600)
    pb.client.send(message("d", b"row"))  # anything at all from the client
    assert await pb.ended() == ConnectionEndReason.IDLE_TIMEOUT
    assert now() - began == 1200 + LIMIT


@virtual_time
async def test_a_query_running_longer_than_the_limit_is_not_cut() -> None:
    pb = await started(idle=IDLE)
    pb.client.send(QUERY)
    await asyncio.sleep(10 * LIMIT)  # pg_sleep(9000): the server says nothing
    assert pb.running
    pb.server.send(SERVER_STREAM)  # the result, then ReadyForQuery
    answered = now()
    assert await pb.ended() == ConnectionEndReason.IDLE_TIMEOUT
    assert now() - answered == LIMIT
    assert bytes(pb.client.written) == SERVER_STREAM + IDLE.termination.error_response()


@virtual_time
async def test_a_pipeline_waits_for_every_ready_for_query() -> None:
    pb = await started(idle=IDLE)
    pb.client.send(QUERY, SYNC)
    pb.server.send(SERVER_STREAM)  # answers the Query; the Sync is still due
    await asyncio.sleep(10 * LIMIT)
    assert pb.running
    await client_leaves(pb)


@virtual_time
async def test_the_greetings_ready_for_query_does_not_answer_a_pipelined_query() -> None:
    pb = Playbook(idle=IDLE)
    pb.relay.prime(GREETING, QUERY)  # the client sent its first Query with its startup
    await pb.start()
    await asyncio.sleep(10 * LIMIT)
    assert pb.running
    await client_leaves(pb)
