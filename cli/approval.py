"""Waiting in `pam db access` for a request to be approved.

Polls the request every ``POLL_SECONDS`` and shows who can approve it and where
it stands (a live line on a terminal, a line per change otherwise). Returns the
request id once approved; a denial, an expiry or a cancellation is an error;
Ctrl+C (or SIGTERM) cancels the request, so nothing is left waiting for an
approver's attention.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from rich.status import Status

from cli.client import ApiClient, ApiError, RequestJson
from cli.commands.requests import approvers_of
from cli.render import console, human_duration, is_interactive, parse_time, printable

POLL_SECONDS = 2.0


class RequestEnded(ApiError):
    """The request was denied, expired or cancelled while the CLI waited."""


def wait_for_approval(client: ApiClient, request: RequestJson, *, json_lines: bool = False) -> str:
    """Wait until *request* is approved; its id. Ctrl+C cancels it. With
    *json_lines* stdout gets one JSON line per change (``approval_pending``,
    then ``approved`` or the error on stderr) instead of text."""
    if json_lines:
        _emit("approval_pending", request)
    else:
        console.print(
            f"[bold]Access needs approval[/]: request {request['id'][:8]} needs"
            f" {request['approvals_required']} approval(s) from"
            f" {printable(approvers_of(request))}."
        )
        console.print(
            f"  An approver runs: pam requests approve {request['id'][:8]}"
            "   (Ctrl+C cancels the request)"
        )
        console.file.flush()
    status = (
        Status(_line(request), console=console) if is_interactive() and not json_lines else None
    )
    shown = _line(request)
    try:
        if status is not None:
            status.start()
        while request["state"] == "pending":
            time.sleep(POLL_SECONDS)
            try:
                request = client.get_request(request["id"])
            except ApiError as exc:
                if exc.status is not None:
                    raise
                continue  # the gateway is briefly unreachable: keep waiting
            line = _line(request)
            if status is not None:
                status.update(line)
            elif line != shown and not json_lines:
                console.print(line)
                console.file.flush()
            shown = line
    except KeyboardInterrupt:
        if status is not None:
            status.stop()
        client.cancel_request(request["id"])
        raise RequestEnded(f"cancelled request {request['id'][:8]}") from None
    finally:
        if status is not None:
            status.stop()
    # An extension request is applied by the gateway as it is approved.
    done = ("approved", "opened") if request["extends"] else ("approved",)
    if request["state"] not in done:
        raise RequestEnded(_ended(request))
    if json_lines:
        _emit("approved", request)
    else:
        console.print(f"Request {request['id'][:8]} approved by {_approvers(request)}.")
    return request["id"]


def _emit(event: str, request: RequestJson) -> None:
    line: dict[str, Any] = {
        "event": event,
        "at": datetime.now(UTC).isoformat(),
        "request_id": request["id"],
        "approvals_required": request["approvals_required"],
        "approvers": request["approvers"],
        "approvals": [a["by"] for a in request["approvals"]],
        "expires_at": request["expires_at"],
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _line(request: RequestJson) -> str:
    left = ""
    deadline = parse_time(request["expires_at"])
    if deadline is not None:
        seconds = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
        left = f", expires in {human_duration(seconds)}"
    return (
        f"waiting: {len(request['approvals'])} of {request['approvals_required']} approval(s){left}"
    )


def _approvers(request: RequestJson) -> str:
    return printable(", ".join(a["by"] for a in request["approvals"]) or "nobody")


def _ended(request: RequestJson) -> str:
    note = f": {request['decision_note']}" if request["decision_note"] else ""
    if request["state"] == "denied":
        return f"request {request['id'][:8]} was denied by {request['decided_by']}{note}"
    if request["state"] == "expired":
        return f"request {request['id'][:8]} expired{note}"
    if request["state"] == "cancelled":
        return f"request {request['id'][:8]} was cancelled by {request['decided_by']}"
    return f"request {request['id'][:8]} is {request['state']}"
