"""`pam sso ...`: the gateway's OpenID Connect provider and its group mapping
(admins of every project). Signing in is `pam login --sso`.

The client secret is read from stdin's first line (or a no-echo prompt), sent
once, and never shown: `pam sso show` has no field for it.
"""

from __future__ import annotations

import sys

import click

from cli.commands import api_client, json_option
from cli.render import console, local_time, print_json, printable, table


@click.group("sso")
def sso() -> None:
    """Single sign-on with OpenID Connect (admins of every project)."""


def _read_secret(from_stdin: bool) -> str | None:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        line = click.prompt(
            "Client secret (empty: keep the stored one)",
            hide_input=True,
            default="",
            show_default=False,
        )
        if not line:
            return None
    else:
        return None
    if not line:
        raise click.UsageError("the client secret is empty")
    return line


@sso.command("configure")
@click.option("--issuer", required=True, help="The provider's issuer URL (https://...).")
@click.option("--client-id", required=True, help="The gateway's client id at the provider.")
@click.option(
    "--client-secret-stdin",
    is_flag=True,
    help="Read the client secret from stdin's first line (else prompted; kept if empty).",
)
@click.option(
    "--groups-claim",
    default="groups",
    show_default=True,
    help="The ID token claim that lists the user's groups.",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="A scope to ask for (repeatable; default: openid profile email).",
)
@click.option(
    "--redirect-base",
    default=None,
    help="The gateway's public https:// base as browsers reach it; the callback"
    " is BASE/v1/sso/callback (default: the address each CLI uses).",
)
@json_option
def sso_configure(
    issuer: str,
    client_id: str,
    client_secret_stdin: bool,
    groups_claim: str,
    scopes: tuple[str, ...],
    redirect_base: str | None,
    as_json: bool,
) -> None:
    """Set the identity provider; the gateway checks its discovery document."""
    secret = _read_secret(client_secret_stdin)
    with api_client() as client:
        config = client.sso_configure(
            issuer=issuer,
            client_id=client_id,
            client_secret=secret,
            groups_claim=groups_claim,
            scopes=" ".join(scopes) if scopes else "openid profile email",
            redirect_base=redirect_base,
        )
    if as_json:
        print_json(config)
        return
    console.print(f"Single sign-on with {printable(config['issuer'])} is set up", markup=False)
    _print_callback(config["redirect_uri"])


def _print_callback(redirect_uri: str | None) -> None:
    if redirect_uri:
        console.print(
            f"Register this redirect URI at the provider: {printable(redirect_uri)}", markup=False
        )
    else:
        console.print(
            "Register GATEWAY/v1/sso/callback at the provider for each address CLIs use"
            " (or set --redirect-base)",
            markup=False,
        )


@sso.command("show")
@json_option
def sso_show(as_json: bool) -> None:
    """The provider's settings (never the client secret)."""
    with api_client() as client:
        config = client.sso_config()
    if as_json:
        print_json(config)
        return
    for label, value in (
        ("issuer", config["issuer"]),
        ("client id", config["client_id"]),
        ("client secret", "(set; never shown)"),
        ("groups claim", config["groups_claim"]),
        ("scopes", config["scopes"]),
        (
            "redirect URI",
            config["redirect_uri"] or "GATEWAY/v1/sso/callback (as each CLI reaches it)",
        ),
        ("updated", local_time(config["updated_at"])),
    ):
        console.print(f"{label:>14}: {printable(value)}", markup=False)


@sso.command("remove")
def sso_remove() -> None:
    """Turn single sign-on off (its users stay; they cannot sign in with it)."""
    with api_client() as client:
        client.sso_remove()
    console.print("Single sign-on is off")


@sso.command("map-group")
@click.argument("claim_value")
@click.argument("group")
@click.option(
    "--project",
    default=None,
    help="Also make holders members of this project (the member role only).",
)
@json_option
def sso_map_group(claim_value: str, group: str, project: str | None, as_json: bool) -> None:
    """Holders of CLAIM_VALUE in the groups claim join @GROUP at each sign-in."""
    with api_client() as client:
        mapping = client.sso_map_group(claim_value, group.removeprefix("@"), project)
    if as_json:
        print_json(mapping)
        return
    member = f", members of {mapping['project']}" if mapping["project"] else ""
    console.print(
        f"{printable(mapping['claim_value'])} -> @{printable(mapping['group'])}{printable(member)}",
        markup=False,
    )


@sso.command("unmap-group")
@click.argument("claim_value")
def sso_unmap_group(claim_value: str) -> None:
    """Remove CLAIM_VALUE's mapping (its holders lose the group at their next sign-in)."""
    with api_client() as client:
        client.sso_unmap_group(claim_value)
    console.print(f"Removed the mapping of {printable(claim_value)}", markup=False)


@sso.command("groups")
@json_option
def sso_groups(as_json: bool) -> None:
    """The group mapping: claim value -> pam group (and project membership)."""
    with api_client() as client:
        mappings = client.sso_groups()
    if as_json:
        print_json(mappings)
        return
    table(
        None,
        ["claim value", "group", "member of"],
        [[m["claim_value"], "@" + m["group"], m["project"] or ""] for m in mappings],
    )


__all__ = ["sso"]
