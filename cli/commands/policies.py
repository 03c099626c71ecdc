"""`pam policy add|list|remove`: who may open which accounts, for how long."""

from __future__ import annotations

import click

from cli.access import parse_duration
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
@click.option("--project", default="default", show_default=True)
@json_option
def policy_add(
    name: str,
    subjects: tuple[str, ...],
    resource_glob: str,
    account_glob: str,
    max_duration: str,
    require_reason: bool,
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
        ["name", "project", "subjects", "resource", "account", "max", "reason"],
        [
            [
                p["name"],
                p["project"],
                ", ".join(p["subjects"]),
                p["resource_glob"],
                p["account_glob"],
                human_duration(p["max_duration_seconds"]),
                "required" if p["require_reason"] else "",
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
