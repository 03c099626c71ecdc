"""`pam grant`: act on a live access grant from anywhere (another terminal, a script).

`pam grant extend ID --by 30m` moves the grant's expiry later; the gateway
checks the caller's policy (the grant's whole new length) and its own maximum
again; where the policy asks for approval, an extension request waits for it.
Live connections are not touched; the `pam db access` holding the grant
sees the new expiry on its next heartbeat.
"""

from __future__ import annotations

import click

from cli.access import parse_duration
from cli.approval import wait_for_approval
from cli.client import PendingApproval
from cli.commands import api_client, json_option
from cli.render import console, local_time, print_json, printable


@click.group()
def grant() -> None:
    """Act on a live access grant: extend it."""


@grant.command("extend")
@click.argument("session_id", metavar="ID")
@click.option("--by", "by", required=True, help="How much later it expires: 30m, 1h, 90s.")
@json_option
def grant_extend(session_id: str, by: str, as_json: bool) -> None:
    """Move a live grant's expiry later; its connections are not touched.
    Where a policy asks for approval this waits for it (Ctrl+C cancels the
    extension request); the gateway applies it once approved."""
    seconds = parse_duration(by)
    with api_client() as client:
        try:
            extended = client.extend_access(session_id, seconds)
        except PendingApproval as pending:
            wait_for_approval(client, pending.request, json_lines=as_json)
            extended = client.get_session(pending.request["session_id"] or session_id)["session"]
    if as_json:
        print_json(extended)
        return
    console.print(
        f"Extended session {printable(extended['id'][:8])}: it now expires"
        f" {local_time(extended['expires_at'])}.",
        markup=False,
    )
