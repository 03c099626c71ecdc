"""`pam login`, `pam logout`, `pam whoami`, `pam user ...` and `pam token create`.

A session token from `pam login` and a machine token from `pam token create`
are shown or stored once: the gateway keeps only their hashes. The client
config (0600) keeps one profile per gateway; logging in to one never replaces
another's.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.access import parse_duration
from cli.client import ApiClient, ApiError
from cli.commands import api_client, json_option, read_password
from cli.mfa import with_second_factor
from cli.render import console, local_time, print_json, printable, table
from cli.sso_login import sso_sign_in
from gateway.config import (
    Profile,
    client_config_path,
    load_client_config,
    save_client_config,
    save_profile,
)

ROLES = click.Choice(["admin", "auditor", "member"])


@click.command("login")
@click.option("--gateway", "api_url", required=True, help="The gateway's API, https://HOST:PORT.")
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The gateway's CA certificate (`pam gateway ca-cert`), pinned from now on.",
)
@click.option("--user", "user", default=None, help="Your user name (password sign-in).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.option("--sso", is_flag=True, help="Sign in with the gateway's identity provider.")
@click.option(
    "--device",
    is_flag=True,
    help="With --sso: show a code to enter in a browser anywhere (no browser here).",
)
@click.option(
    "--otp",
    default=None,
    help="The second-factor code, for a user who enrolled one (asked for if needed;"
    " with --password-stdin, stdin's second line).",
)
def login(
    api_url: str,
    ca_cert: Path | None,
    user: str | None,
    password_stdin: bool,
    sso: bool,
    device: bool,
    otp: str | None,
) -> None:
    """Sign in to a gateway; its session token is kept in the client config.

    With a password (--user), or with single sign-on (--sso): the URL to open is
    printed (and opened in a browser where there is one; PAM_NO_BROWSER=1 never
    does), and `--sso --device` shows a code to enter on any device instead.
    """
    api_url = api_url.rstrip("/")
    if sso == (user is not None):
        raise click.UsageError("give either --user (a password) or --sso")
    if device and not sso:
        raise click.UsageError("--device is for --sso")
    if sso and password_stdin:
        raise click.UsageError("--password-stdin is for --user")
    if sso and otp:
        raise click.UsageError("--otp is for --user: the identity provider asks for its own")
    password = None if sso else read_password(password_stdin, f"Password for {user}", confirm=False)
    pem = ca_cert.read_text() if ca_cert else None
    groups: list[str] = []
    with ApiClient(Profile(api_url=api_url, token="", ca_cert=pem)) as client:
        if password is not None and user is not None:
            issued = with_second_factor(lambda code: client.login(user, password, otp=code), otp)
            token, name, expires_at = issued["token"], issued["user"], issued["expires_at"]
        else:
            done = sso_sign_in(client, device=device)
            token, name, expires_at = done["token"] or "", done["user"] or "", done["expires_at"]
            groups = done["groups"]
        gateway_id = client.health()["gateway_id"]
        signed_in = Profile(api_url=api_url, token=token, user=name, ca_cert=pem)
        others = _fleet_others(signed_in)
    path = save_profile(signed_in.model_copy(update={"gateway_id": gateway_id, "api_urls": others}))
    until = local_time(expires_at) if expires_at else "until revoked"
    member = f"; groups {', '.join(groups)}" if groups else ""
    if others:
        member += f"; fails over to {', '.join(others)}"
    console.print(
        f"Signed in to {printable(api_url)} as {printable(name)} ({until}{printable(member)});"
        f" {path}",
        markup=False,
    )


def _fleet_others(signed_in: Profile) -> list[str]:
    """The fleet's other gateways: where this CLI fails over to. A gateway that
    cannot say (an older one) costs the failover, not the sign-in: its token is
    issued already, so the profile is kept, with a warning."""
    try:
        with ApiClient(signed_in) as client:
            return [url for url in client.fleet() if url.rstrip("/") != signed_in.api_url]
    except ApiError as exc:
        click.echo(
            f"warning: the gateway did not list the other gateways ({exc.message});"
            " this profile will not fail over",
            err=True,
        )
        return []


@click.command("logout")
@click.option("--gateway", "api_url", default=None, help="Another gateway's profile to remove.")
def logout(api_url: str | None) -> None:
    """Revoke the session token and remove the gateway's profile."""
    config = load_client_config()
    target = (api_url or config.api_url).rstrip("/")
    profile = config.current if target == config.api_url else config.profiles.get(target)
    if profile is None:
        raise click.UsageError(f"no profile for {target} in the client configuration")
    try:
        with ApiClient(profile) as client:
            client.logout()
    except Exception as exc:  # the profile goes either way; say why the revoke did not
        click.echo(f"warning: the gateway did not revoke the token: {exc}", err=True)
    remaining = config.without(target)
    if remaining is None:
        client_config_path().unlink(missing_ok=True)
    else:
        save_client_config(remaining)
    console.print(f"Signed out of {printable(target)}", markup=False)


@click.command("whoami")
@json_option
def whoami(as_json: bool) -> None:
    """Who the gateway says you are, and your roles."""
    with api_client() as client:
        me = client.whoami()
    if as_json:
        print_json(me)
        return
    roles = ", ".join(
        f"{role} of {'every project' if p == '*' else p}" for p, role in me["roles"].items()
    )
    groups = f"; groups {', '.join(me['groups'])}" if me["groups"] else ""
    second = "; second factor on" if me.get("mfa_enabled") else ""
    console.print(f"{printable(me['name'])} ({me['kind']}): {roles}{groups}{second}")


@click.group("user")
def user() -> None:
    """Manage users (admins of every project)."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=ROLES, required=True)
@click.option("--project", default="*", show_default=True, help="The project the role holds in.")
@click.option("--group", "groups", multiple=True, help="A group (policies name @group).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin's first line.")
@click.option("--no-password", is_flag=True, help="No password (the user cannot sign in yet).")
@json_option
def user_add(
    name: str,
    role: str,
    project: str,
    groups: tuple[str, ...],
    password_stdin: bool,
    no_password: bool,
    as_json: bool,
) -> None:
    """Add a user with a role; the password is prompted for (or read from stdin)."""
    password = None if no_password else read_password(password_stdin, f"Password for {name}")
    with api_client() as client:
        created = client.add_user(
            name, role=role, project=project, groups=list(groups), password=password
        )
    if as_json:
        print_json(created)
    else:
        console.print(f"Added user {printable(name)} ({role} of {printable(project)})")


@user.command("list")
@json_option
def user_list(as_json: bool) -> None:
    with api_client() as client:
        users = client.list_users()
    if as_json:
        print_json(users)
        return
    table(
        None,
        ["name", "kind", "roles", "groups", "password", "mfa", "disabled"],
        [
            [
                u["name"],
                u["kind"],
                ", ".join(f"{r}@{p}" for p, r in u["roles"].items()),
                ", ".join(u["groups"]),
                "yes" if u["has_password"] else "no",
                "on" if u.get("mfa_enabled") else "off",
                local_time(u["disabled_at"]) if u["disabled_at"] else "",
            ]
            for u in users
        ],
    )


@user.command("disable")
@click.argument("name")
def user_disable(name: str) -> None:
    """Disable a user: tokens revoked, live grants ended."""
    with api_client() as client:
        client.disable_user(name)
    console.print(f"Disabled {printable(name)}: tokens revoked, live grants ended")


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove a user (one named by sessions stays, disabled)."""
    with api_client() as client:
        client.remove_user(name)
    console.print(f"Removed {printable(name)}")


@click.group("token")
def token() -> None:
    """Machine tokens for automation (used through PAM_TOKEN)."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["auditor", "member"]), default="member", show_default=True
)
@click.option("--project", default="*", show_default=True)
@click.option("--ttl", default="30d", show_default=True, help="How long it lasts: 30d, 12h, 2w.")
@json_option
def token_create(name: str, role: str, project: str, ttl: str, as_json: bool) -> None:
    """Create a machine principal NAME and its token (shown once, here)."""
    with api_client() as client:
        issued = client.create_token(
            name, role=role, project=project, ttl_seconds=parse_duration(ttl)
        )
    if as_json:
        print_json(issued)
        return
    click.echo(issued["token"])
    click.echo(
        f"machine token for {name}, {role} of {project}, until {local_time(issued['expires_at'])};"
        " shown once: store it now (use it as PAM_TOKEN)",
        err=True,
    )


__all__ = ["login", "logout", "token", "user", "whoami"]
