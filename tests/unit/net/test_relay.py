"""Playbook tests of the relay: both peers scripted against its callbacks, no sockets.

Each test plays the client and the server (see ``playbook.py``) and asserts what
each receives: bytes forwarded whole and in order however the stream is cut,
a FATAL to the client only between server messages, a Terminate to the server
only between client messages, and why and with how many bytes a connection
ended. Time is the loop's virtual clock, so grace periods are exact and
instant. Flow control and the audit tap are in ``test_relay_flow.py``.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from playbook import (
    MemoryTransport,
    Playbook,
    RecordingAudit,
    cstr,
    ends_at_boundary,
    message,
    split_at,
    virtual_time,
)
from relay_script import (
    BIND,
    DESCRIBE,
    EXECUTE,
    ONE_ROW,
    PARSE,
    QUERY,
    ROW_DESCRIPTION,
    SERVER_STREAM,
    SERVER_TAPPED,
    SYNC,
    TERMINATE,
    TIMEOUT,
    client_leaves,
    fatal,
    started,
)

from gateway.net.relay import BOUNDARY_GRACE_SECONDS, CLOSE_TIMEOUT_SECONDS, Termination
from gateway.protocol import messages
from gateway.protocol.framing import BoundaryTracker
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason


def test_the_script_is_whole_messages() -> None:
    assert ends_at_boundary(SERVER_STREAM)
    tracker = BoundaryTracker(max_length=1 << 20, tap=frozenset(b"CZ"), measure=frozenset(b"D"))
    assert tracker.feed(SERVER_STREAM) == SERVER_TAPPED


# --- forwarding ----------------------------------------------------------------------


async def _relay_server_chunks(chunks: list[bytes]) -> None:
    pb = await started(audit=RecordingAudit())
    pb.server.send(*chunks)
    await pb.settle()
    assert pb.client.writes == chunks  # one write per read, each chunk whole
    assert bytes(pb.client.written) == SERVER_STREAM
    assert pb.audit is not None and pb.audit.from_server == SERVER_TAPPED
    assert pb.running
    assert await client_leaves(pb) is ConnectionEndReason.CLIENT_CLOSED


@virtual_time
async def test_server_messages_cut_at_any_one_offset_reach_the_client_in_order() -> None:
    # every offset: inside a header, right after it, inside a body, between messages
    for cut in range(1, len(SERVER_STREAM)):
        await _relay_server_chunks(split_at(SERVER_STREAM, [cut]))


@virtual_time
async def test_server_messages_fed_one_byte_at_a_time_reach_the_client_in_order() -> None:
    await _relay_server_chunks(split_at(SERVER_STREAM, range(1, len(SERVER_STREAM))))


@virtual_time
async def test_server_messages_in_random_chunks_reach_the_client_in_order() -> None:
    rng = random.Random(11)
    for _ in range(200):
        cuts = rng.sample(range(1, len(SERVER_STREAM)), rng.randint(1, 12))
        await _relay_server_chunks(split_at(SERVER_STREAM, cuts))


@virtual_time
async def test_a_pipelined_conversation_crosses_both_ways_byte_for_byte() -> None:
    pb = await started(audit=RecordingAudit())
    client_stream = PARSE + BIND + DESCRIBE + EXECUTE + SYNC + QUERY
    answer = SERVER_STREAM + ROW_DESCRIPTION + ONE_ROW + message("C", cstr("SELECT 1"))
    answer += messages.ready_for_query()
    client_chunks = split_at(client_stream, [3, 20, 21, len(PARSE + BIND) + 2, 70])
    server_chunks = split_at(answer, [1, 4, 5, 17, 60, 61, 90, len(SERVER_STREAM) + 3])
    # the two directions interleave, chunk by chunk
    for index in range(max(len(client_chunks), len(server_chunks))):
        if index < len(server_chunks):
            pb.server.send(server_chunks[index])
        if index < len(client_chunks):
            pb.client.send(client_chunks[index])
    await pb.settle()
    assert pb.server.writes == client_chunks
    assert pb.client.writes == server_chunks
    assert pb.audit is not None
    assert [(t.type, t.body) for t in pb.audit.from_client] == [
        (ord(m[:1]), m[5:]) for m in (PARSE, BIND, EXECUTE, QUERY)
    ]
    assert [(t.type, t.body, t.measured_messages) for t in pb.audit.from_server] == [
        (ord("C"), cstr("SELECT 2"), 2),
        (ord("Z"), b"I", 2),
        (ord("C"), cstr("SELECT 1"), 3),
        (ord("Z"), b"I", 3),
    ]
    assert await client_leaves(pb) is ConnectionEndReason.CLIENT_CLOSED


@virtual_time
async def test_bytes_left_from_the_handshake_are_forwarded_before_new_ones() -> None:
    pb = Playbook(client_pending=QUERY[:7], server_pending=SERVER_STREAM[:9])
    pb.relay.prime(to_client=messages.authentication_ok(), to_server=b"")
    await pb.start()
    pb.client.send(QUERY[7:])
    pb.server.send(SERVER_STREAM[9:])
    await pb.settle()
    assert bytes(pb.server.written) == QUERY
    assert bytes(pb.client.written) == messages.authentication_ok() + SERVER_STREAM
    await client_leaves(pb)


# --- a FATAL only between server messages -----------------------------------------------

#: Offsets inside SERVER_STREAM's third message (RowDescription, 10..) where a
#: terminate() finds the server mid-message: inside the header, right after
#: it, inside the body, one byte before its end.
ROW_DESCRIPTION_START = 10
MID_MESSAGE = [
    ROW_DESCRIPTION_START + 1,
    ROW_DESCRIPTION_START + 4,
    ROW_DESCRIPTION_START + 5,
    ROW_DESCRIPTION_START + 12,
    ROW_DESCRIPTION_START + len(ROW_DESCRIPTION) - 1,
]


@virtual_time
async def test_terminate_between_server_messages_writes_the_fatal_at_once() -> None:
    pb = await started()
    pb.client.send(QUERY[:6])
    pb.server.send(SERVER_STREAM[:ROW_DESCRIPTION_START])
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    assert bytes(pb.client.written) == SERVER_STREAM[:ROW_DESCRIPTION_START] + fatal()
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert pb.client.lost and pb.server.lost


@pytest.mark.parametrize("cut", MID_MESSAGE)
@virtual_time
async def test_terminate_mid_message_writes_the_fatal_after_the_message_ends(cut: int) -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM[:cut])
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM[:cut]  # no FATAL inside the message
    assert pb.running
    # the rest of the message and one more, ending at a boundary
    rest_end = ROW_DESCRIPTION_START + len(ROW_DESCRIPTION) + len(ONE_ROW)
    pb.server.send(SERVER_STREAM[cut:rest_end])
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert bytes(pb.client.written) == SERVER_STREAM[:rest_end] + fatal()


@virtual_time
async def test_a_chunk_ending_inside_the_next_message_does_not_release_the_fatal() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM[: ROW_DESCRIPTION_START + 3])
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    # the RowDescription ends inside this chunk, but the chunk ends inside a DataRow
    in_data_row = ROW_DESCRIPTION_START + len(ROW_DESCRIPTION) + 2
    pb.server.send(SERVER_STREAM[ROW_DESCRIPTION_START + 3 : in_data_row])
    await pb.settle()
    assert pb.running
    assert fatal() not in pb.client.written
    pb.server.send(SERVER_STREAM[in_data_row:])
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert bytes(pb.client.written) == SERVER_STREAM + fatal()


@virtual_time
async def test_a_stalled_server_is_cut_after_the_grace_period_without_a_fatal() -> None:
    loop = asyncio.get_running_loop()
    pb = await started()
    pb.server.send(SERVER_STREAM[: MID_MESSAGE[2]])
    await pb.settle()
    begun = loop.time()
    pb.relay.terminate(TIMEOUT)
    await asyncio.sleep(BOUNDARY_GRACE_SECONDS * 0.9)
    assert pb.running  # still waiting for the message to end
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert loop.time() - begun == pytest.approx(BOUNDARY_GRACE_SECONDS)
    # cut off inside the message: nothing is appended to it
    assert bytes(pb.client.written) == SERVER_STREAM[: MID_MESSAGE[2]]
    assert pb.client.lost and pb.server.lost


@virtual_time
async def test_a_terminate_before_run_at_a_boundary_ends_at_once() -> None:
    pb = Playbook()
    pb.relay.prime(
        to_client=messages.authentication_ok() + messages.ready_for_query(), to_server=b""
    )
    pb.relay.terminate(TIMEOUT)
    await pb.start()
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    greeting = messages.authentication_ok() + messages.ready_for_query()
    assert bytes(pb.client.written) == greeting + fatal()


@virtual_time
async def test_nothing_follows_the_fatal_of_a_terminate_before_run() -> None:
    pb = Playbook(server_pending=ONE_ROW[:3])
    pb.relay.prime(to_client=messages.ready_for_query(), to_server=b"")
    pb.relay.terminate(TIMEOUT)
    await pb.start()
    await pb.ended()
    assert bytes(pb.client.written).endswith(fatal())


# --- a Terminate upstream only between client messages ---------------------------------


@virtual_time
async def test_a_gateway_side_end_says_terminate_to_the_server_between_client_messages() -> None:
    pb = await started()
    pb.client.send(QUERY)
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    await pb.ended()
    assert bytes(pb.server.written) == QUERY + TERMINATE


@pytest.mark.parametrize("cut", [1, 4, 5, 9])
@virtual_time
async def test_no_terminate_goes_to_the_server_inside_a_client_message(cut: int) -> None:
    pb = await started()
    pb.client.send(SYNC + QUERY[:cut])
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert bytes(pb.server.written) == SYNC + QUERY[:cut]
    assert pb.server.lost


@virtual_time
async def test_a_client_that_vanishes_between_messages_has_the_server_told() -> None:
    pb = await started()
    pb.client.send(QUERY)
    pb.client.send_eof()
    assert await pb.ended() is ConnectionEndReason.CLIENT_CLOSED
    assert bytes(pb.server.written) == QUERY + TERMINATE


@virtual_time
async def test_a_client_that_says_goodbye_sends_the_server_one_terminate() -> None:
    pb = await started()
    await client_leaves(pb)
    assert bytes(pb.server.written) == TERMINATE


@virtual_time
async def test_a_server_that_closes_gets_nothing_more() -> None:
    pb = await started()
    pb.client.send(QUERY)
    pb.server.send(SERVER_STREAM)
    pb.server.send_eof()
    assert await pb.ended() is ConnectionEndReason.SERVER_CLOSED
    assert bytes(pb.server.written) == QUERY
    assert bytes(pb.client.written) == SERVER_STREAM
    assert pb.server.writes_after_close == 0


# --- end reasons and byte counters -----------------------------------------------------------


@virtual_time
async def test_a_client_that_says_goodbye_ends_as_client_closed() -> None:
    pb = await started()
    pb.client.send(QUERY)
    pb.server.send(SERVER_STREAM)
    assert await client_leaves(pb) is ConnectionEndReason.CLIENT_CLOSED
    assert pb.relay.bytes_from_client == len(QUERY + TERMINATE)
    assert pb.relay.bytes_from_server == len(SERVER_STREAM)
    assert pb.relay.error is None


@virtual_time
async def test_a_server_that_closes_ends_as_server_closed() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM)
    pb.server.send_eof()
    assert await pb.ended() is ConnectionEndReason.SERVER_CLOSED
    assert pb.client.lost and pb.server.lost
    assert pb.relay.bytes_from_server == len(SERVER_STREAM)


@virtual_time
async def test_terminate_ends_with_its_reason_and_counts_only_relayed_bytes() -> None:
    pb = Playbook()
    pb.relay.prime(to_client=messages.authentication_ok(), to_server=QUERY)
    await pb.start()
    pb.server.send(SERVER_STREAM)
    await pb.settle()
    pb.relay.terminate(TIMEOUT)
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    # the injected FATAL and Terminate are the gateway's, not the peers'
    assert pb.relay.bytes_from_client == len(QUERY)
    assert pb.relay.bytes_from_server == len(messages.authentication_ok() + SERVER_STREAM)
    assert pb.relay.end_reason is ConnectionEndReason.EXPIRED


@virtual_time
async def test_a_second_terminate_changes_nothing() -> None:
    pb = await started()
    pb.relay.terminate(TIMEOUT)
    shutdown = Termination(ConnectionEndReason.GATEWAY_SHUTDOWN, SqlState.ADMIN_SHUTDOWN, "bye")
    pb.relay.terminate(shutdown)
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert bytes(pb.client.written) == fatal()


@virtual_time
async def test_a_reset_connection_ends_as_error_with_a_connection_failure() -> None:
    pb = await started()
    pb.client.send(QUERY)
    pb.server.reset(ConnectionResetError("reset by peer"))
    assert await pb.ended() is ConnectionEndReason.ERROR
    assert pb.relay.error is not None
    assert pb.relay.error[0] == SqlState.CONNECTION_FAILURE
    assert pb.client.lost


@virtual_time
async def test_bytes_after_the_end_are_not_forwarded_nor_counted() -> None:
    pb = await started()
    pb.relay.terminate(TIMEOUT)
    pb.server.send(SERVER_STREAM)  # the relay's transports close only as it winds up
    pb.client.send(QUERY)
    await pb.ended()
    assert bytes(pb.client.written) == fatal()
    assert pb.relay.bytes_from_server == pb.relay.bytes_from_client == 0


# --- broken framing ------------------------------------------------------------------------

#: A header whose length (2) is below the minimum of 4.
BAD_HEADER = b"D\x00\x00\x00\x02"


@virtual_time
async def test_a_server_breaking_the_framing_ends_as_error_with_a_fatal() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM[:ROW_DESCRIPTION_START])
    await pb.settle()
    pb.server.send(BAD_HEADER + bytes(8))
    assert await pb.ended() is ConnectionEndReason.ERROR
    assert pb.relay.error is not None and pb.relay.error[0] == SqlState.PROTOCOL_VIOLATION
    client = bytes(pb.client.written)
    assert client[:ROW_DESCRIPTION_START] == SERVER_STREAM[:ROW_DESCRIPTION_START]
    assert client[ROW_DESCRIPTION_START] == ord("E")
    error = messages.parse_error_fields(client[ROW_DESCRIPTION_START + 5 :])
    assert (error.severity, error.sqlstate) == ("FATAL", SqlState.PROTOCOL_VIOLATION)
    assert ends_at_boundary(client)


@virtual_time
async def test_a_fatal_for_broken_server_framing_never_lands_inside_a_message() -> None:
    pb = await started()
    pb.server.send(SERVER_STREAM[: ROW_DESCRIPTION_START + 8])
    await pb.settle()
    # the RowDescription's last bytes, then a header the tracker refuses
    row_description_end = ROW_DESCRIPTION_START + len(ROW_DESCRIPTION)
    pb.server.send(SERVER_STREAM[ROW_DESCRIPTION_START + 8 : row_description_end] + BAD_HEADER)
    assert await pb.ended() is ConnectionEndReason.ERROR
    assert ends_at_boundary(bytes(pb.client.written))


@virtual_time
async def test_no_terminate_follows_a_broken_client_header() -> None:
    pb = await started()
    pb.client.send(QUERY + BAD_HEADER[:3])
    await pb.settle()
    pb.client.send(BAD_HEADER[3:])
    assert await pb.ended() is ConnectionEndReason.ERROR
    assert bytes(pb.server.written) == QUERY + BAD_HEADER[:3]


@virtual_time
async def test_whole_client_messages_before_a_bad_header_are_forwarded_and_terminate_once() -> None:
    pb = await started()
    pb.client.send(QUERY + TERMINATE + BAD_HEADER)
    assert await pb.ended() is ConnectionEndReason.ERROR
    # The query and the client's own Terminate go on; no second Terminate follows.
    assert bytes(pb.server.written) == QUERY + TERMINATE


# --- closing ------------------------------------------------------------------------------


@virtual_time
async def test_a_client_that_never_reads_its_fatal_is_aborted_after_the_close_timeout() -> None:
    loop = asyncio.get_running_loop()
    pb = await started(peers_read=False)
    pb.server.send(SERVER_STREAM)  # never read by the client: close() cannot flush
    await pb.settle()
    begun = loop.time()
    pb.relay.terminate(TIMEOUT)
    assert await pb.ended() is ConnectionEndReason.EXPIRED
    assert loop.time() - begun == pytest.approx(CLOSE_TIMEOUT_SECONDS)
    assert pb.client.aborted and pb.server.aborted


def test_the_memory_transport_is_a_transport() -> None:
    assert issubclass(MemoryTransport, asyncio.Transport)
