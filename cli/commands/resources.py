"""`pam resource`: register PostgreSQL servers, show them, and verify their accounts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from cli.client import ResourceJson, VerifyResultJson
from cli.commands import api_client, json_option, read_password
from cli.render import console, key_values, local_time, print_json, printable, table

#: gateway.net.upstream's SslMode, in libpq's order. Spelled out rather than
#: imported: the data path's modules add a tenth of a second to every command.
#: tests/unit/cli/test_commands.py keeps the two equal.
SSL_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


@click.group()
def resource() -> None:
    """Register PostgreSQL servers (resources)."""


@resource.command("add")
@click.argument("name")
@click.option("--host", required=True)
@click.option("--port", type=click.IntRange(1, 65535), default=5432, show_default=True)
@click.option("--database", required=True, help="The one database this resource gives access to.")
@click.option("--ssl-mode", type=click.Choice(SSL_MODES), default="verify-full", show_default=True)
@click.option(
    "--ca-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="PEM file of the CA that signs the server certificate.",
)
@json_option
def resource_add(
    name: str,
    host: str,
    port: int,
    database: str,
    ssl_mode: str,
    ca_cert: Path | None,
    as_json: bool,
) -> None:
    """Register a resource."""
    with api_client() as client:
        created = client.add_resource(
            name,
            host=host,
            port=port,
            database=database,
            ssl_mode=ssl_mode,
            ca_cert=ca_cert.read_text() if ca_cert else None,
        )
    if as_json:
        print_json(created)
    else:
        console.print(
            f"Resource {created['name']} added ({host}:{port}/{database}, ssl {ssl_mode})."
        )


def _resource_rows(resources: list[ResourceJson]) -> list[list[Any]]:
    return [
        [
            r["name"],
            f"{r['host']}:{r['port']}",
            r["database"],
            r["ssl_mode"],
            "custom" if r["ca_cert"] else "system",
            local_time(r["created_at"]),
        ]
        for r in resources
    ]


@resource.command("list")
@json_option
def resource_list(as_json: bool) -> None:
    """List resources."""
    with api_client() as client:
        resources = client.list_resources()
    if as_json:
        print_json(resources)
    else:
        table(
            None,
            ["NAME", "ADDRESS", "DATABASE", "SSL MODE", "CA", "CREATED"],
            _resource_rows(resources),
        )


@resource.command("show")
@click.argument("name")
@json_option
def resource_show(name: str, as_json: bool) -> None:
    """Show one resource and its accounts."""
    with api_client() as client:
        res = client.get_resource(name)
        accounts = client.list_accounts(name)
    if as_json:
        print_json({**res, "accounts": accounts})
        return
    key_values(
        [
            ("name", res["name"]),
            ("address", f"{res['host']}:{res['port']}"),
            ("database", res["database"]),
            ("ssl mode", res["ssl_mode"]),
            ("CA", "custom (PEM stored)" if res["ca_cert"] else "system trust store"),
            ("created", local_time(res["created_at"])),
            (
                "rotation role",
                res["rotation_username"] or "none (each account changes its own password)",
            ),
            ("reassign to", res["reassign_to"] or "the rotation role"),
            (
                "accounts",
                ", ".join(
                    f"{a['name']} (user {a['username']})"
                    if a["template_role"] is None
                    else f"{a['name']} (a role per grant, in {a['template_role']})"
                    for a in accounts
                )
                or "none",
            ),
        ]
    )


@resource.command("remove")
@click.argument("name")
def resource_remove(name: str) -> None:
    """Remove a resource and its accounts."""
    with api_client() as client:
        client.remove_resource(name)
    console.print(f"Resource {name} removed.")


@resource.command("set-rotation")
@click.argument("name")
@click.option(
    "--username",
    required=True,
    help="The role that changes the accounts' passwords (CREATEROLE; see docs/credentials.md).",
)
@click.option(
    "--password-stdin", is_flag=True, help="Read its password from the first line of stdin."
)
@click.option("--no-verify", is_flag=True, help="Store it without signing in with it first.")
@click.option(
    "--reassign-to",
    default=None,
    metavar="ROLE",
    help="Who gets what a grant's own role owned when it is dropped (REASSIGN OWNED;"
    " default: the rotation role).",
)
def resource_set_rotation(
    name: str, username: str, password_stdin: bool, no_verify: bool, reassign_to: str | None
) -> None:
    """Set the role that rotates this resource's accounts' passwords, and makes
    and drops the roles of its ephemeral accounts' grants.

    Without one, an account rotates its own password (ALTER ROLE CURRENT_USER).
    """
    password = read_password(password_stdin, f"Password for {username}")
    with api_client() as client:
        client.set_rotation_role(
            name,
            username=username,
            password=password,
            verify=not no_verify,
            reassign_to=reassign_to,
        )
    checked = "" if no_verify else " (it signs in upstream)"
    console.print(
        f"Rotation role of {name} set to {username}{checked}; stored encrypted. What grant"
        f" roles own goes to {reassign_to or username} when they are dropped."
    )


@resource.command("roles")
@click.argument("name")
@json_option
def resource_roles(name: str, as_json: bool) -> None:
    """The database roles pam made for grants and has not dropped yet."""
    with api_client() as client:
        roles = client.grant_roles(name)
    if as_json:
        print_json(roles)
        return
    table(
        None,
        ["ROLE", "ACCOUNT", "SESSION", "GRANT ENDED", "DROP AFTER", "TRIES", "LAST ERROR"],
        [
            [
                r["role"],
                r["account"],
                r["session_id"][:8],
                local_time(r["session_ended_at"]) if r["session_ended_at"] else "live",
                local_time(r["drop_after"]),
                str(r["attempts"]),
                printable(r["last_error"]),
            ]
            for r in roles
        ],
    )


@resource.command("clear-rotation")
@click.argument("name")
def resource_clear_rotation(name: str) -> None:
    """Forget the rotation role: each account rotates its own password."""
    with api_client() as client:
        client.clear_rotation_role(name)
    console.print(f"Rotation role of {name} removed; its accounts rotate themselves.")


@resource.command("verify")
@click.argument("name")
@click.option("--account", default=None, help="Verify only this account (default: all).")
@json_option
def resource_verify(name: str, account: str | None, as_json: bool) -> None:
    """Connect upstream with the stored credentials and report the outcome."""
    with api_client() as client:
        results = client.verify_resource(name, account)
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console.print(_verified_line(r))
            else:
                click.echo(_failed_line(r), err=True)
    if not all(r["ok"] for r in results):
        sys.exit(1)


def _verified_line(r: VerifyResultJson) -> Text:
    # The server version and cipher come from the server: shown escaped, never
    # read as markup.
    details = (
        f"  {r['resource']}/{r['account']} at {r['address']}:"
        f" PostgreSQL {r['server_version']}, {r['tls_version'] or 'no TLS'}"
        f"{' ' + r['cipher'] if r['cipher'] else ''}, auth {r['auth_method']},"
        f" {r['latency_ms']} ms"
    )
    return Text.assemble(("ok", "green"), printable(details))


def _failed_line(r: VerifyResultJson) -> str:
    hint = f" (hint: {r['hint']})" if r["hint"] else ""
    return printable(
        f"FAILED  {r['resource']}/{r['account']} at {r['address']}:"
        f" [{r['error_kind']}, {r['error_sqlstate']}] {r['error']}{hint}"
    )
