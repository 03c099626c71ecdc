"""The script the relay's playbook tests play: PostgreSQL messages and small helpers.

Shared by ``test_relay.py`` (forwarding, ending, framing) and
``test_relay_flow.py`` (backpressure, the audit tap). ``SERVER_STREAM`` is a
result with empty bodies, an asynchronous NotificationResponse and
ParameterStatus between rows, so every kind of cut meets it.
"""

from __future__ import annotations

from playbook import Playbook, cstr, message

from gateway.net.relay import Termination
from gateway.protocol import messages
from gateway.protocol.framing import TappedMessage
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

QUERY = message("Q", cstr("select n from t"))
PARSE = message("P", cstr("") + cstr("select $1::int") + b"\x00\x00")
BIND = message("B", cstr("") + cstr("") + b"\x00\x00\x00\x01\x00\x00\x00\x017\x00\x00")
DESCRIBE = message("D", b"P" + cstr(""))
EXECUTE = message("E", cstr("") + b"\x00\x00\x00\x00")
SYNC = message("S")
TERMINATE = messages.terminate()

ROW_DESCRIPTION = message("T", b"\x00\x01" + cstr("n") + bytes(18))
SERVER_STREAM_PARTS = [
    message("1"),  # ParseComplete: an empty body
    message("2"),  # BindComplete
    ROW_DESCRIPTION,
    message("D", b"\x00\x01\x00\x00\x00\x017"),
    message("A", b"\x00\x00\x00\x2a" + cstr("jobs") + cstr("ready")),  # a NOTIFY between rows
    message("D", b"\x00\x01\x00\x00\x00\x0242"),
    message("S", cstr("TimeZone") + cstr("UTC")),  # ParameterStatus, unasked for
    message("C", cstr("SELECT 2")),
    messages.ready_for_query(),
]
SERVER_STREAM = b"".join(SERVER_STREAM_PARTS)
#: What the tap must see of SERVER_STREAM (C and Z, with the DataRows measured).
SERVER_TAPPED = [
    TappedMessage(ord("C"), cstr("SELECT 2"), False, 2, 15),
    TappedMessage(ord("Z"), b"I", False, 2, 15),
]
ONE_ROW = message("D", b"\x00\x01\x00\x00\x00\x01x")
TIMEOUT = Termination(
    ConnectionEndReason.EXPIRED, SqlState.ADMIN_SHUTDOWN, "the access session has expired"
)


def fatal(termination: Termination = TIMEOUT) -> bytes:
    return termination.error_response()


async def started(**kwargs: object) -> Playbook:
    return await Playbook(**kwargs).start()  # type: ignore[arg-type]


async def client_leaves(pb: Playbook) -> ConnectionEndReason:
    pb.client.send(TERMINATE)
    pb.client.send_eof()
    return await pb.ended()  # type: ignore[no-any-return]
