"""`pam policy add|list|remove`: who may open which accounts, for how long."""

from __future__ import annotations

import click

from cli.access import parse_duration
from cli.api_json import PolicyJson
from cli.commands import api_client, json_option
from cli.render import console, human_duration, print_json, printable, table


@click.group("policy")
def policy() -> None:
    """Access policies (deny by default)."""


@policy.command("add")
@click.argument("name")
@click.option("--subject", "subjects", multiple=True, required=True, help="A user name or @group.")
@click.option("--resource", "resource_glob", required=True, help="Resource name or glob.")
@click.option("--account", "account_glob", required=True, help="Account name or glob.")
@click.option("--max-duration", required=True, help="The longest grant: 2h, 30m, 1d.")
@click.option("--require-reason", is_flag=True, help="Refuse requests without --reason.")
@click.option(
    "--require-approval",
    "approvals",
    type=click.IntRange(0, 10),
    default=0,
    help="Distinct approvers needed before access opens.",
)
@click.option(
    "--approver",
    "approvers",
    multiple=True,
    help="Who may approve: a user name or @group (default: the project's admins).",
)
@click.option(
    "--break-glass", is_flag=True, help="Allow access without waiting, with a reason, recorded."
)
@click.option("--require-mfa", is_flag=True, help="Ask for a second factor once per grant.")
@click.option("--idle-timeout", help="Cut connections idle this long: 15m, 1h.")
@click.option("--project", default="default", show_default=True)
@json_option
def policy_add(
    name: str,
    subjects: tuple[str, ...],
    resource_glob: str,
    account_glob: str,
    max_duration: str,
    require_reason: bool,
    approvals: int,
    approvers: tuple[str, ...],
    break_glass: bool,
    require_mfa: bool,
    idle_timeout: str | None,
    project: str,
    as_json: bool,
) -> None:
    """Allow SUBJECTs to open matching accounts for at most --max-duration."""
    body = {
        "name": name,
        "project": project,
        "subjects": list(subjects),
        "resource": resource_glob,
        "account": account_glob,
        "max_duration_seconds": parse_duration(max_duration),
        "require_reason": require_reason,
        "approvals_required": approvals,
        "approvers": list(approvers),
        "break_glass": break_glass,
        "require_mfa": require_mfa,
        "idle_timeout_seconds": parse_duration(idle_timeout) if idle_timeout else None,
    }
    with api_client() as client:
        added = client.add_policy(body)
    if as_json:
        print_json(added)
    else:
        console.print(f"Added policy {printable(name)}")


@policy.command("list")
@json_option
def policy_list(as_json: bool) -> None:
    with api_client() as client:
        found = client.list_policies()
    if as_json:
        print_json(found)
        return
    table(
        None,
        ["name", "project", "subjects", "resource", "account", "max", "asks"],
        [
            [
                p["name"],
                p["project"],
                ", ".join(p["subjects"]),
                p["resource_glob"],
                p["account_glob"],
                human_duration(p["max_duration_seconds"]),
                _asks(p),
            ]
            for p in found
        ],
    )


@policy.command("remove")
@click.argument("name")
def policy_remove(name: str) -> None:
    with api_client() as client:
        client.remove_policy(name)
    console.print(f"Removed policy {printable(name)}")


def _asks(p: PolicyJson) -> str:
    """What a policy asks of a requester, in a few words."""
    asks = []
    if p["require_reason"]:
        asks.append("reason")
    if p["approvals_required"]:
        who = ", ".join(p["approvers"]) or "admins"
        asks.append(f"{p['approvals_required']} approval(s) by {who}")
    if p["break_glass"]:
        asks.append("break-glass allowed")
    if p["require_mfa"]:
        asks.append("MFA")
    if p["idle_timeout_seconds"]:
        asks.append(f"idle {human_duration(p['idle_timeout_seconds'])}")
    return "; ".join(asks)
