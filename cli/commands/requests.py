"""`pam requests list|show|approve|deny|cancel`: access that waits on approval.

A request is made by `pam db access` when a policy asks for approval; it waits
there until approved (or `pam db access --request ID` opens it later).
"""

from __future__ import annotations

import click

from cli.client import RequestJson
from cli.commands import api_client, json_option
from cli.mfa import with_second_factor
from cli.render import console, human_duration, key_values, local_time, print_json, printable, table


@click.group("requests")
def requests() -> None:
    """Access requests: approve, deny, cancel, look."""


@requests.command("list")
@click.option("--mine", is_flag=True, help="Only your own requests.")
@click.option("--pending", is_flag=True, help="Only pending requests you may decide.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@json_option
def requests_list(mine: bool, pending: bool, limit: int, as_json: bool) -> None:
    with api_client() as client:
        found = client.list_requests(mine=mine, pending=pending, limit=limit)
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["id", "state", "requester", "resource/account", "for", "approvals", "reason", "created"],
        [
            [
                r["id"][:8],
                _state(r),
                r["requester"],
                f"{r['resource']}/{r['account']}",
                human_duration(r["duration_seconds"]),
                f"{len(r['approvals'])}/{r['approvals_required']}",
                r["reason"] or "",
                local_time(r["created_at"]),
            ]
            for r in found
        ],
    )


@requests.command("show")
@click.argument("request_id")
@json_option
def requests_show(request_id: str, as_json: bool) -> None:
    """A request and what happened to it (its records in the access trail)."""
    with api_client() as client:
        request = client.get_request(request_id)
        trail = client.request_trail(request["id"])
    if as_json:
        print_json({"request": request, "trail": trail})
        return
    key_values(
        [
            ("id", request["id"]),
            ("state", _state(request)),
            ("requester", request["requester"]),
            ("resource", request["resource"]),
            ("account", request["account"]),
            ("duration", human_duration(request["duration_seconds"])),
            ("reason", request["reason"] or ""),
            ("policy", request["policy_name"]),
            ("approvers", approvers_of(request)),
            ("approvals", f"{len(request['approvals'])} of {request['approvals_required']}"),
            ("expires", local_time(request["use_by"] or request["expires_at"])),
            ("session", request["session_id"] or ""),
        ]
    )
    table(
        "trail",
        ["seq", "at", "what", "by", "detail"],
        [
            [t["seq"], local_time(t["at"]), t["kind"], t["actor"], _detail(t["detail"])]
            for t in trail
        ],
    )


@requests.command("approve")
@click.argument("request_id")
@click.option("--comment", default=None, help="Recorded with the approval.")
@click.option(
    "--otp",
    default=None,
    help="Your second-factor code, where the project asks for one (asked for if needed).",
)
@json_option
def requests_approve(request_id: str, comment: str | None, otp: str | None, as_json: bool) -> None:
    """Approve a request (its requester never can); where its project says so
    (`pam project set P --approval-mfa`), with your second-factor code."""
    with api_client() as client:
        request = with_second_factor(
            lambda code: client.approve_request(request_id, comment, code), otp
        )
    if as_json:
        print_json(request)
    elif request["state"] == "approved":
        who = printable(request["requester"])
        console.print(f"Approved request {request['id'][:8]}: {who} may open it now.", markup=False)
    else:
        console.print(
            f"Approved request {request['id'][:8]}"
            f" ({len(request['approvals'])} of {request['approvals_required']} approvals)."
        )


@requests.command("deny")
@click.argument("request_id")
@click.option("--reason", required=True, help="Why (the requester sees it).")
@json_option
def requests_deny(request_id: str, reason: str, as_json: bool) -> None:
    with api_client() as client:
        request = client.deny_request(request_id, reason)
    if as_json:
        print_json(request)
    else:
        console.print(f"Denied request {request['id'][:8]}.")


@requests.command("cancel")
@click.argument("request_id")
@json_option
def requests_cancel(request_id: str, as_json: bool) -> None:
    with api_client() as client:
        request = client.cancel_request(request_id)
    if as_json:
        print_json(request)
    else:
        console.print(f"Cancelled request {request['id'][:8]}.")


def approvers_of(request: RequestJson) -> str:
    return ", ".join(request["approvers"]) or f"the admins of project {request['project']}"


def _state(request: RequestJson) -> str:
    if request["break_glass"]:
        return f"{request['state']} (break-glass)"
    return request["state"]


def _detail(detail: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if v not in (None, ""))
