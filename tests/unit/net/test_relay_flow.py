"""Playbook tests of the relay's flow control and audit tap, no sockets.

Backpressure both ways (a full write buffer pauses reading the other side until
it drains) and from the audit tap (a congested tap pauses reading the server
until it has room), and what the tap is given. See ``playbook.py``.
"""

from __future__ import annotations

from playbook import RecordingAudit, message, split_at, virtual_time
from relay_script import (
    BIND,
    PARSE,
    QUERY,
    SERVER_STREAM,
    SERVER_TAPPED,
    SYNC,
    client_leaves,
    started,
)

from gateway.net.relay import Termination
from gateway.protocol import messages
from gateway.protocol.framing import TappedMessage
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

#: What the audit tap answers when its journal cannot be written.
UNRECORDABLE = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE, SqlState.SYSTEM_ERROR, "cannot record (test)"
)

# --- backpressure ------------------------------------------------------------------------


@virtual_time
async def test_a_full_client_buffer_pauses_reading_the_server_until_it_drains() -> None:
    pb = await started(high=64, low=16, peers_read=False)
    pb.server.send(SERVER_STREAM[:70])
    assert pb.client.writing_paused
    assert not pb.server.reading
    pb.server.send(SERVER_STREAM[70:])  # waits in the "socket"
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM[:70]
    pb.client.read(40)  # 30 left: still above the low-water mark
    await pb.settle()
    assert not pb.server.reading
    pb.client.read(14)  # 16 left: at the low-water mark
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM  # what waited, in order
    assert pb.client.writing_paused  # 16 + 60 bytes: over the mark again
    assert not pb.server.reading
    pb.client.read()
    await pb.settle()
    assert pb.server.reading
    assert pb.client.reading  # the other direction was never paused
    await client_leaves(pb)


@virtual_time
async def test_a_full_server_buffer_pauses_reading_the_client_until_it_drains() -> None:
    pb = await started(high=32, low=0, peers_read=False)
    copy_data = [message("d", bytes([n]) * 20) for n in range(4)]
    pb.client.send(copy_data[0], copy_data[1])
    assert pb.server.writing_paused
    assert not pb.client.reading
    pb.client.send(copy_data[2], copy_data[3])
    await pb.settle()
    assert bytes(pb.server.written) == copy_data[0] + copy_data[1]
    pb.server.read()
    await pb.settle()
    assert bytes(pb.server.written) == b"".join(copy_data)
    assert not pb.client.reading  # the last two filled the buffer again
    pb.server.read()
    await pb.settle()
    assert pb.client.reading
    assert pb.server.reading
    await client_leaves(pb)


@virtual_time
async def test_a_congested_audit_pauses_reading_the_server_until_it_has_room() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit)
    audit.congested = True
    pb.server.send(SERVER_STREAM[:30])
    await pb.settle()
    assert not pb.server.reading
    assert audit.room_waits == 1
    pb.server.send(SERVER_STREAM[30:])
    pb.client.send(QUERY)  # the client side keeps flowing
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM[:30]
    assert bytes(pb.server.written) == QUERY
    audit.make_room()
    await pb.settle()
    assert pb.server.reading
    assert bytes(pb.client.written) == SERVER_STREAM
    assert audit.from_server == SERVER_TAPPED
    assert audit.room_waits == 1
    await client_leaves(pb)


@virtual_time
async def test_a_drained_client_does_not_resume_the_server_while_the_audit_is_congested() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit, high=20, low=0, peers_read=False)
    audit.congested = True
    pb.server.send(SERVER_STREAM[:30])
    await pb.settle()
    pb.client.read()
    await pb.settle()
    assert not pb.server.reading
    audit.make_room()
    await pb.settle()
    assert pb.server.reading
    await client_leaves(pb)


@virtual_time
async def test_audit_room_does_not_resume_the_server_while_the_client_is_full() -> None:
    # The client's transport calls pause_writing once, so when the audit has room
    # again only the client's resume_writing may resume the server.
    audit = RecordingAudit()
    pb = await started(audit=audit, high=20, low=0, peers_read=False)
    audit.congested = True
    pb.server.send(SERVER_STREAM[:30])
    await pb.settle()
    assert pb.client.writing_paused
    audit.make_room()
    await pb.settle()
    assert not pb.server.reading
    pb.server.send(SERVER_STREAM[30:])
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM[:30]  # nothing more piles up
    pb.client.read()
    await pb.settle()
    assert bytes(pb.client.written) == SERVER_STREAM
    await client_leaves(pb)


# --- the audit tap -------------------------------------------------------------------------


@virtual_time
async def test_the_tap_gets_the_client_statements_and_the_goodbye() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit)
    pb.client.send(QUERY[:3], QUERY[3:] + PARSE[:8], PARSE[8:] + BIND + SYNC)
    await client_leaves(pb)
    assert audit.from_client == [
        TappedMessage(ord("Q"), QUERY[5:]),
        TappedMessage(ord("P"), PARSE[5:]),
        TappedMessage(ord("B"), BIND[5:]),
        TappedMessage(ord("X"), b""),  # always tapped: it tells the relay the client left
    ]


@virtual_time
async def test_the_tap_gets_server_batches_in_stream_order() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit)
    pb.server.send(SERVER_STREAM[:-3], SERVER_STREAM[-3:])
    await pb.settle()
    assert audit.server_batches == [SERVER_TAPPED[:1], SERVER_TAPPED[1:]]
    await client_leaves(pb)


@virtual_time
async def test_a_long_statement_is_tapped_truncated_but_forwarded_whole() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit)
    long_query = message("Q", b"x" * (300 * 1024) + b"\x00")
    pb.client.send(*split_at(long_query, range(1, len(long_query), 65536)))
    await pb.settle()
    assert bytes(pb.server.written) == long_query
    [tapped] = audit.from_client
    assert tapped.truncated
    assert tapped.body == b"x" * len(tapped.body)
    await client_leaves(pb)


@virtual_time
async def test_a_client_chunk_is_on_record_before_the_server_gets_it() -> None:
    audit = RecordingAudit()
    pb = await started(audit=audit)
    audit.probe = lambda: bytes(pb.server.written)
    pb.client.send(QUERY, PARSE + BIND + SYNC)
    await pb.settle()
    # At each record, the server had none of the chunk being recorded.
    assert audit.probed == [b"", QUERY]
    assert bytes(pb.server.written) == QUERY + PARSE + BIND + SYNC
    await client_leaves(pb)


@virtual_time
async def test_a_chunk_that_cannot_be_recorded_is_not_forwarded_and_the_client_is_told_why() -> (
    None
):
    audit = RecordingAudit()
    pb = await started(audit=audit)
    pb.client.send(QUERY)
    pb.server.send(SERVER_STREAM)
    await pb.settle()
    audit.refusal = UNRECORDABLE
    # The second half of a Parse completes it: the server must not get that half.
    pb.client.send(PARSE[:6])
    await pb.settle()
    pb.client.send(PARSE[6:] + SYNC)
    assert await pb.ended() == ConnectionEndReason.AUDIT_UNAVAILABLE
    assert bytes(pb.server.written) == QUERY + PARSE[:6]  # and no Terminate inside the Parse
    assert bytes(pb.client.written) == SERVER_STREAM + UNRECORDABLE.error_response()
    error = messages.parse_error_fields(bytes(pb.client.written)[len(SERVER_STREAM) + 5 :])
    assert (error.severity, error.sqlstate) == ("FATAL", SqlState.SYSTEM_ERROR)
    assert pb.relay.fatal_sqlstate == SqlState.SYSTEM_ERROR
