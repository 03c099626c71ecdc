"""`pam db access`: open a time-boxed local port to a resource and hold it.

The holding (heartbeats, Ctrl+C, the end report) is :func:`cli.access.hold_access`,
which ``pam demo`` shares.
"""

from __future__ import annotations

import os
import sys

import click

from cli.access import hold_access, is_remote, parse_duration
from cli.commands import api_client


@click.group()
def db() -> None:
    """Get access to a database."""


@db.command("access")
@click.option("--resource", "resource_name", default=None, help="Required unless --request.")
@click.option("--account", "account_name", default=None, help="Required unless --request.")
@click.option(
    "--duration",
    default=None,
    help="How long the grant lasts: 1h, 30m, 1h30m, 90s.  [default: 1h]",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Local port (default: a free one)."
)
@click.option(
    "--tunnel/--no-tunnel",
    default=None,
    help="Carry connections to the gateway's tunnel from a local port of this process"
    " (default: when the gateway is on another host).",
)
@click.option(
    "--reason", default=None, help="Why you need access (recorded; a policy may require it)."
)
@click.option(
    "--socket",
    "socket_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Serve a Unix socket in this directory (mode 0700, yours) instead of a TCP port;"
    " --port names the socket (default 5432).",
)
@click.option(
    "--request",
    "request_id",
    default=None,
    help="Open this approved access request (its resource, account and duration).",
)
@click.option(
    "--break-glass",
    is_flag=True,
    help="Skip the approval a policy asks for, where it allows break-glass (needs --reason;"
    " recorded apart and notified).",
)
@click.option(
    "--extend-by",
    default="30m",
    show_default=True,
    help="What the e key extends the grant by (on a terminal).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the connection details as one JSON line, then one JSON line per event"
    " (extended, expiring, ended).",
)
@click.option(
    "--otp",
    default=None,
    help="A second-factor code, where the policy asks for one (asked for if needed).",
)
def db_access(
    otp: str | None,
    resource_name: str | None,
    account_name: str | None,
    duration: str | None,
    port: int | None,
    reason: str | None,
    socket_dir: str | None,
    tunnel: bool | None,
    request_id: str | None,
    break_glass: bool,
    extend_by: str,
    as_json: bool,
) -> None:
    """Open a time-boxed local port to a resource, as an account, with no password.

    The port accepts connections only from your own OS user's processes (Linux).
    On a terminal a status line shows the time left; press e to extend the grant.
    Where the policy asks for a second factor, its code is asked for once, here:
    the grant's connections never ask.
    """
    if request_id is None and (resource_name is None or account_name is None):
        raise click.UsageError("give --resource and --account (or --request ID)")
    if request_id is not None and break_glass:
        raise click.UsageError("--break-glass asks anew: it does not go with --request")
    if request_id is None and duration is None:
        duration = "1h"
    seconds = parse_duration(duration) if duration is not None else None
    extend_seconds = parse_duration(extend_by)
    with api_client() as client:
        code = hold_access(
            client,
            resource=resource_name,
            account=account_name,
            duration_seconds=seconds,
            port=port,
            reason=reason,
            # The daemon's working directory is not ours: send an absolute path.
            socket_dir=os.path.abspath(socket_dir) if socket_dir is not None else None,
            tunnel=is_remote(client) if tunnel is None else tunnel,
            request_id=request_id,
            break_glass=break_glass,
            json_events=as_json,
            extend_by=extend_seconds,
            otp=otp,
        )
    sys.exit(code)
