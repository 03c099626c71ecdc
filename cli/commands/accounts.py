"""`pam account`: database accounts (credentials) stored, sealed, for a resource.

A password is read from a no-echo prompt or the first line of stdin, never from
argv, and is never printed. A typed password is checked by signing in upstream
before it is stored (``--no-verify`` stores it anyway); ``pam account rotate
--now`` and ``--managed`` have the gateway generate one that nobody sees, and
``--every 7d`` (``off``) has it do so on a schedule.
"""

from __future__ import annotations

import click

from cli.access import parse_duration
from cli.client import AccountJson, RotationJson
from cli.commands import api_client, json_option, read_password
from cli.render import console, local_time, print_json, printable, table
from gateway.errors import GatewayError

_NO_VERIFY_HELP = "Store it without signing in upstream with it first."


@click.group()
def account() -> None:
    """Store database accounts (credentials) for resources."""


@account.command("add")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option("--username", default=None, help="The PostgreSQL role to log in as.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@click.option("--no-verify", is_flag=True, help=_NO_VERIFY_HELP)
@click.option(
    "--managed",
    is_flag=True,
    help="Rotate the password right away: the one typed stops working and nobody"
    " knows the new one.",
)
@click.option(
    "--ephemeral",
    is_flag=True,
    help="No password: each grant signs in as a database role of its own, made for it"
    " (needs the resource's rotation role and --template).",
)
@click.option(
    "--template",
    "template_role",
    default=None,
    help="With --ephemeral: the role each grant's role is a member of (what the person may do).",
)
@click.option(
    "--cleanup-after",
    default=None,
    metavar="DURATION",
    help="With --ephemeral: drop a grant's role this long after the grant (1d, 12h;"
    " default: at its end). It cannot sign in from the grant's end on.",
)
@json_option
def account_add(
    resource_name: str,
    name: str,
    username: str | None,
    password_stdin: bool,
    no_verify: bool,
    managed: bool,
    ephemeral: bool,
    template_role: str | None,
    cleanup_after: str | None,
    as_json: bool,
) -> None:
    """Add an account; the password is prompted for (or read from stdin), checked
    upstream and stored encrypted. With --ephemeral there is no password: each
    grant gets a database role of its own, made in --template."""
    if ephemeral:
        _add_ephemeral(
            resource_name,
            name,
            username=username,
            template_role=template_role,
            cleanup_after=cleanup_after,
            password_stdin=password_stdin,
            managed=managed,
            verify=not no_verify,
            as_json=as_json,
        )
        return
    if template_role is not None or cleanup_after is not None:
        raise click.UsageError("--template and --cleanup-after go with --ephemeral")
    if username is None:
        raise click.UsageError("--username is required (or --ephemeral --template ROLE)")
    password = read_password(password_stdin, f"Password for {username}")
    with api_client() as client:
        created = client.add_account(
            resource_name,
            name,
            username=username,
            password=password,
            verify=not no_verify,
            managed=managed,
        )
    rotation = created["rotation"]
    if as_json:
        print_json(created)
    elif rotation is None:
        checked = "" if no_verify else " checked upstream and"
        console.print(
            f"Account {resource_name}/{name} (user {printable(username)}) added; the password"
            f" was{checked} stored encrypted.",
            markup=False,
        )
    elif rotation["ok"]:
        console.print(
            f"Account {resource_name}/{name} (user {printable(username)}) added and rotated:"
            " the password you typed no longer works, and nobody knows the current one.",
            markup=False,
        )
    if rotation is not None and not rotation["ok"]:
        raise GatewayError(
            f"account {resource_name}/{name} was added, but its first rotation failed"
            f" ({rotation['outcome']}): {rotation['detail']}; the password you typed"
            " is still the one in use",
            hint=rotation["hint"],
        )


def _add_ephemeral(
    resource_name: str,
    name: str,
    *,
    username: str | None,
    template_role: str | None,
    cleanup_after: str | None,
    password_stdin: bool,
    managed: bool,
    verify: bool,
    as_json: bool,
) -> None:
    if username is not None or password_stdin or managed:
        raise click.UsageError(
            "--ephemeral takes no --username, --password-stdin or --managed: each grant"
            " gets a role and a password of its own"
        )
    if template_role is None:
        raise click.UsageError("--ephemeral needs --template ROLE")
    seconds = None if cleanup_after is None else parse_duration(cleanup_after)
    with api_client() as client:
        created = client.add_ephemeral_account(
            resource_name,
            name,
            template_role=template_role,
            cleanup_after_seconds=seconds,
            verify=verify,
        )
    if as_json:
        print_json(created)
        return
    when = "at the grant's end" if seconds is None else f"{cleanup_after} after the grant"
    console.print(
        f"Account {resource_name}/{name} added: each grant signs in as a role of its own,"
        f" a member of {printable(template_role)}, dropped {when}.",
        markup=False,
    )


@account.command("rotate")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option(
    "--now",
    is_flag=True,
    help="Generate a new password and set it upstream now (nobody sees it).",
)
@click.option(
    "--every",
    metavar="DURATION|off",
    default=None,
    help="Rotate on a schedule: every 1h, 12h, 1d, 7d, 30d... (off: stop). With"
    " --now, also rotate now.",
)
@click.option("--password-stdin", is_flag=True, help="Read the new password from stdin.")
@click.option("--no-verify", is_flag=True, help=_NO_VERIFY_HELP)
@json_option
def account_rotate(
    resource_name: str,
    name: str,
    now: bool,
    every: str | None,
    password_stdin: bool,
    no_verify: bool,
    as_json: bool,
) -> None:
    """Store the password the server now has (checked upstream first), or with
    --now have the gateway change it to a generated one, or with --every on a
    schedule."""
    if (now or every is not None) and (password_stdin or no_verify):
        raise click.UsageError(
            "--now and --every generate the password: no --password-stdin/--no-verify"
        )
    if every is not None:
        _schedule(resource_name, name, every, quiet=as_json and now, as_json=as_json)
    if now:
        with api_client() as client:
            result = client.rotate_now(resource_name, name)
        if as_json:
            print_json(result)
        if not result["ok"]:
            raise GatewayError(_rotation_failure(result), hint=result["hint"])
        if not as_json:
            console.print(
                f"Password of {resource_name}/{name} rotated (by {result['via']}):"
                " verified upstream and stored; nobody has seen it."
            )
        return
    if every is not None:
        return
    password = read_password(password_stdin, "New password")
    with api_client() as client:
        stored = client.rotate_password(resource_name, name, password, verify=not no_verify)
    if as_json:
        print_json(stored)
    else:
        checked = "" if no_verify else " (it signs in upstream)"
        console.print(f"Password of {resource_name}/{name} replaced{checked}.")


def _schedule(resource_name: str, name: str, every: str, *, quiet: bool, as_json: bool) -> None:
    off = every.strip().lower() == "off"
    seconds = None if off else parse_duration(every)
    with api_client() as client:
        account = client.set_rotation_schedule(resource_name, name, seconds)
    if quiet:
        return  # --now --json prints the rotation
    if as_json:
        print_json(account)
    elif off:
        console.print(f"Scheduled rotation of {resource_name}/{name} stopped.")
    else:
        console.print(
            f"Password of {resource_name}/{name} rotated every {_every(seconds)}; next at"
            f" {local_time(account['next_rotation_at'])}."
        )


def _every(seconds: int | None) -> str:
    """``90s``, ``30m``, ``12h``, ``7d``: the largest unit that divides it; ``-`` for none."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _result(account: AccountJson) -> str:
    """How the last rotation went, and whether the schedule is retrying."""
    if account["rotation_pending"]:
        return "in progress"
    outcome = account["last_rotation_outcome"] or "-"
    failures = account["rotation_failures"]
    if failures:
        return f"{outcome} (retrying, {failures} failed)"
    return outcome


def _rotation_failure(result: RotationJson) -> str:
    return (
        f"rotation of {result['resource']}/{result['account']} {result['outcome']}:"
        f" {result['detail']}"
    )


@account.command("list")
@click.option("--resource", "resource_name", default=None)
@json_option
def account_list(resource_name: str | None, as_json: bool) -> None:
    """List accounts (never their passwords), with their last rotation."""
    with api_client() as client:
        accounts = client.list_accounts(resource_name)
    if as_json:
        print_json(accounts)
        return
    table(
        None,
        [
            "RESOURCE",
            "ACCOUNT",
            "USERNAME",
            "MANAGED",
            "CREATED",
            "PASSWORD SET",
            "LAST ROTATION",
            "RESULT",
            "EVERY",
            "NEXT ROTATION",
        ],
        [
            [
                a["resource_name"],
                a["name"],
                a["username"]
                if a["template_role"] is None
                else f"per grant, in {a['template_role']}",
                "ephemeral" if a["template_role"] else "yes" if a["managed"] else "no",
                local_time(a["created_at"]),
                local_time(a["password_updated_at"]),
                local_time(a["last_rotation_at"]),
                _result(a),
                _every(a["rotation_interval_seconds"]),
                local_time(a["next_rotation_at"]),
            ]
            for a in accounts
        ],
    )


@account.command("rotations")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@json_option
def account_rotations(resource_name: str, name: str, limit: int, as_json: bool) -> None:
    """The account's rotation record, newest first (who, when, how it ended)."""
    with api_client() as client:
        history = client.rotation_history(resource_name, name, limit=limit)
    if as_json:
        print_json(history)
        return
    table(
        None,
        ["#", "ENDED", "OUTCOME", "METHOD", "VIA", "STARTED BY", "DETAIL"],
        [
            [
                "-" if r["record"] is None else str(r["record"]),
                local_time(r["ended_at"]),
                r["outcome"],
                r["method"],
                r["via"] or "-",
                printable(r["started_by"]),
                printable(r["detail"]),
            ]
            for r in history
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
