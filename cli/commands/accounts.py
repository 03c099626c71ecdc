"""`pam account`: database accounts (credentials) stored, sealed, for a resource.

A password is read from a no-echo prompt or the first line of stdin, never from
argv, and is never printed.
"""

from __future__ import annotations

import click

from cli.commands import api_client, json_option, read_password
from cli.render import console, local_time, print_json, table


@click.group()
def account() -> None:
    """Store database accounts (credentials) for resources."""


@account.command("add")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option("--username", required=True, help="The PostgreSQL role to log in as.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@json_option
def account_add(
    resource_name: str, name: str, username: str, password_stdin: bool, as_json: bool
) -> None:
    """Add an account; the password is prompted for (or read from stdin) and stored encrypted."""
    password = read_password(password_stdin, f"Password for {username}")
    with api_client() as client:
        created = client.add_account(resource_name, name, username=username, password=password)
    if as_json:
        print_json(created)
    else:
        console.print(
            f"Account {resource_name}/{name} (user {username}) added;"
            " the password is stored encrypted."
        )


@account.command("rotate")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option("--password-stdin", is_flag=True)
def account_rotate(resource_name: str, name: str, password_stdin: bool) -> None:
    """Replace an account's stored password."""
    password = read_password(password_stdin, "New password")
    with api_client() as client:
        client.rotate_password(resource_name, name, password)
    console.print(f"Password of {resource_name}/{name} replaced.")


@account.command("list")
@click.option("--resource", "resource_name", default=None)
@json_option
def account_list(resource_name: str | None, as_json: bool) -> None:
    """List accounts (never their passwords)."""
    with api_client() as client:
        accounts = client.list_accounts(resource_name)
    if as_json:
        print_json(accounts)
    else:
        table(
            None,
            ["RESOURCE", "ACCOUNT", "USERNAME", "CREATED", "PASSWORD SET"],
            [
                [
                    a["resource_name"],
                    a["name"],
                    a["username"],
                    local_time(a["created_at"]),
                    local_time(a["password_updated_at"]),
                ]
                for a in accounts
            ],
        )


@account.command("remove")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
def account_remove(resource_name: str, name: str) -> None:
    """Remove an account and its stored password."""
    with api_client() as client:
        client.remove_account(resource_name, name)
    console.print(f"Account {resource_name}/{name} removed.")
