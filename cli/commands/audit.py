"""`pam audit`: search the statement trail, check that its hash chains are intact,
and list the refusals on record.

Rendering is :mod:`cli.review`'s; these commands parse options, ask the typed
client and hand over.
"""

from __future__ import annotations

import sys
from datetime import datetime

import click

from cli.commands import api_client, json_option
from cli.render import console, print_json
from cli.review import API_MAX_PAGE, When, problem_line, refusal_line, search_table
from gateway.audit.records import AUDIT_STATUSES


@click.group()
def audit() -> None:
    """Search the statement audit trail and check that it is intact."""


@audit.command("search")
@click.argument("text", required=False)
@click.option("--since", type=When(), default=None, help="At or after WHEN: 7d, 12h, ISO.")
@click.option("--until", type=When(), default=None, help="Before WHEN.")
@click.option("--resource", "resource_name", default=None)
@click.option("--account", "account_name", default=None)
@click.option("--user", "requester", default=None, help="The requester of the session.")
@click.option("--session", "session_id", default=None, help="Session id or prefix.")
@click.option("--status", type=click.Choice(sorted(AUDIT_STATUSES)), default=None)
@click.option("--limit", type=click.IntRange(1, API_MAX_PAGE), default=100, show_default=True)
@json_option
def audit_search(
    text: str | None,
    since: datetime | None,
    until: datetime | None,
    resource_name: str | None,
    account_name: str | None,
    requester: str | None,
    session_id: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Find statements whose SQL contains TEXT (case-insensitive), newest first."""
    with api_client() as client:
        records = client.search_audit(
            text,
            since=since,
            until=until,
            resource=resource_name,
            account=account_name,
            requester=requester,
            session=session_id,
            status=status,
            limit=limit,
        )
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("No matching records.")
        return
    console.print(search_table(records))
    if len(records) == limit:
        console.print(f"Showing the newest {limit} matches; use --limit for more.")


@audit.command("verify")
@click.argument("session_id", required=False)
@json_option
def audit_verify(session_id: str | None, as_json: bool) -> None:
    """Recompute the hash chain of one session (or all); exit 1 naming each problem."""
    with api_client() as client:
        result = client.verify_audit(session_id)
    problems = result["problems"]
    checked = result["sessions_checked"]
    if as_json:
        print_json(result)
    elif not problems:
        console.print(f"audit trail intact: {checked} session{'s' if checked != 1 else ''} checked")
    else:
        for problem in problems:
            click.echo(problem_line(problem))
    if problems:
        sessions_hit = len({p["session_id"] for p in problems})
        click.echo(
            f"error: the audit trail is not intact: {len(problems)}"
            f" problem{'s' if len(problems) != 1 else ''} in {sessions_hit}"
            f" session{'s' if sessions_hit != 1 else ''}",
            err=True,
        )
        sys.exit(1)


@audit.command("refusals")
@click.option("--since", type=When(), default=None, help="Last seen at or after WHEN: 1h, 7d, ISO.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@json_option
def audit_refusals(since: datetime | None, limit: int, as_json: bool) -> None:
    """Refused API calls and connections, newest first: one line per record, with its count."""
    with api_client() as client:
        params: dict[str, str | int] = {"limit": limit}
        if since is not None:
            params["since"] = since.isoformat()
        records = client.get("/v1/audit/refusals", **params)
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("No refusals on record.")
        return
    for record in records:
        click.echo(refusal_line(record))
