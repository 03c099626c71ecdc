"""`pam gateway`: set up a state directory and run the daemon in the foreground.

The only commands that work on the state directory itself rather than through
the control API. ``--home`` here wins over the root's ``pam --home``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.commands import read_password
from cli.render import console, print_json, printable
from gateway.config import DEFAULT_API_PORT, resolve_home

if TYPE_CHECKING:
    from gateway.app.master_key import Status


@click.group()
def gateway() -> None:
    """Set up and run the gateway daemon."""


home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory (default: $PAM_HOME or the per-user data directory).",
)


def _home(home: Path | None) -> Path:
    given = home or click.get_current_context().find_root().params.get("home")
    return resolve_home(given)


@gateway.command("init")
@home_option
@click.option(
    "--api-port", type=click.IntRange(1, 65535), default=DEFAULT_API_PORT, show_default=True
)
@click.option(
    "--force", is_flag=True, help="Issue a new API token for an existing state directory."
)
@click.option("--admin", default=None, help="The first admin's user name (default: your OS user).")
@click.option(
    "--password-stdin", is_flag=True, help="Read the admin's password from stdin's first line."
)
@click.option(
    "--public-host",
    "public_hosts",
    multiple=True,
    help="A name or address CLIs on other hosts reach this gateway by (repeatable);"
    " the server certificate names it (loopback always).",
)
@click.option(
    "--tunnel-listen",
    default=None,
    metavar="HOST:PORT",
    help="Where the tunnel for CLIs on other hosts listens (default 127.0.0.1, a free port).",
)
def gateway_init(
    home: Path | None,
    api_port: int,
    force: bool,
    admin: str | None,
    password_stdin: bool,
    public_hosts: tuple[str, ...],
    tunnel_listen: str | None,
) -> None:
    """Create the state directory, master key, store, gateway CA, first admin and its
    local token.

    The admin's password (for `pam login` from other hosts) comes from a no-echo
    prompt or --password-stdin; with neither a terminal nor that flag none is
    set, and the admin works from this host only, through the config written here.
    """
    # Imported here: the daemon's stack is heavy and only these commands need it.
    from gateway.app.daemon import init_home

    password = (
        read_password(password_stdin, "Password for the admin (for pam login)")
        if password_stdin or sys.stdin.isatty()
        else None
    )
    result = init_home(
        _home(home),
        api_port=api_port,
        force=force,
        admin=admin,
        password=password,
        public_hosts=public_hosts,
        tunnel_listen=parse_listen(tunnel_listen) if tunnel_listen else None,
    )
    console.print(f"Initialised pam state in {result.home}")
    console.print(f"Client configuration (API token, mode 0600): {result.client_config}")
    if force:
        console.print("The previous local token is revoked; the new one works at once.")
    console.print(f"Start the daemon with: pam gateway run --home {result.home}")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a (host, port) pair."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--tunnel-listen")
    return host, int(port)


@gateway.command("ca-cert")
@home_option
def gateway_ca_cert(home: Path | None) -> None:
    """Print the gateway CA certificate (PEM), for `pam login --ca-cert` elsewhere."""
    from gateway.credentials.pki import load_ca_certificate

    click.echo(load_ca_certificate(_home(home)).decode(), nl=False)


@gateway.command("run")
@home_option
@click.option(
    "--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.option(
    "--tunnel-listen",
    default=None,
    metavar="HOST:PORT",
    help="Where the tunnel listens (default: tunnel_host/tunnel_port of gateway.json).",
)
@click.option(
    "--api-listen",
    default=None,
    metavar="HOST:PORT",
    help="Where the control API (HTTPS) listens (default: api_host/api_port of gateway.json).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Relay processes: 1 relays in the daemon itself; N >= 2 starts N worker"
    " processes sharing the grants' ports (default: workers of gateway.json, 1).",
)
def gateway_run(
    home: Path | None,
    log_format: str,
    log_level: str,
    tunnel_listen: str | None,
    api_listen: str | None,
    workers: int | None,
) -> None:
    """Run the gateway daemon in the foreground (stops on SIGTERM/SIGINT)."""
    from gateway.app import daemon, runtime
    from gateway.app.logging import configure_logging

    configure_logging("json" if log_format == "json" else "console", log_level)
    with asyncio.Runner(loop_factory=runtime.event_loop_factory()) as runner:
        runner.run(
            daemon.run(
                _home(home),
                log_format=log_format,
                log_level=log_level,
                tunnel_listen=parse_listen(tunnel_listen) if tunnel_listen else None,
                api_listen=parse_listen(api_listen) if api_listen else None,
                workers=workers,
            )
        )


@gateway.command("rotate-master-key")
@home_option
@click.option(
    "--stage",
    "step",
    flag_value="stage",
    default=True,
    help="Make a new key version in this gateway's ring, not active (the default).",
)
@click.option(
    "--activate",
    "step",
    flag_value="activate",
    help="Make the staged version active (every live gateway must hold it) and"
    " re-seal every secret under it.",
)
@click.option("--status", "step", flag_value="status", help="Show where the rotation stands.")
@click.option(
    "--retire",
    "retire_version",
    type=click.IntRange(1),
    default=None,
    metavar="VERSION",
    help="Remove an old key version from this gateway's ring once nothing uses it.",
)
@click.option("--json", "as_json", is_flag=True, help="With --status: print JSON.")
def gateway_rotate_master_key(
    home: Path | None, step: str, retire_version: int | None, as_json: bool
) -> None:
    """Rotate the master key without downtime: stage, copy, activate, retire.

    Each step is run on a gateway host and may be repeated; the runbook is in
    docs/operations.md ("Master key rotation"). No step prints a key.
    """
    from gateway.app import master_key

    where = _home(home)
    if retire_version is not None and step != "stage":
        raise click.UsageError(f"--retire is a step of its own: give it without --{step}")
    if retire_version is not None:
        removed = master_key.retire(where, retire_version)
        what = f"removed {removed}" if removed else "its key file was already gone"
        click.echo(f"Master key version {retire_version} retired from {where}: {what}.")
    elif step == "activate":
        done = master_key.activate(where)
        click.echo(
            f"Master key version {done.version} is active; re-sealed {done.resealed} stored"
            f" secret(s) and {len(done.resealed_files)} file(s) here."
        )
        click.echo(f"Sealed values by key version: {_counts(done.counts)}")
    elif step == "status":
        _print_status(master_key.status(where), as_json)
    else:
        staged = master_key.stage(where)
        made = "Staged new" if staged.created else "Already staged:"
        click.echo(
            f"{made} master key version {staged.version} (active: {staged.active}),"
            f" not active yet: {staged.path}"
        )
        click.echo(
            f"Copy that file to master.keys/{staged.version}.key in every other gateway's"
            " state directory (mode 0600; running gateways pick it up at their next presence"
            " renewal), then run: pam gateway rotate-master-key --activate"
        )


def _counts(counts: dict[int, int]) -> str:
    return ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items())) or "none"


def _print_status(status: Status, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "active": status.active,
                "held": list(status.held),
                "sealed": {str(v): n for v, n in sorted(status.counts.items())},
                "gateways": {g.gateway_id: list(g.versions) for g in status.gateways},
                "files": status.files,
            }
        )
        return
    click.echo(f"Active master key version: {status.active}")
    click.echo(f"Held here: {', '.join(map(str, status.held))}")
    click.echo(f"Sealed values in the store by key version: {_counts(status.counts)}")
    files = ", ".join(f"{name}: v{v}" for name, v in sorted(status.files.items())) or "none"
    click.echo(f"Sealed files here: {files}")
    for g in status.gateways:
        held = ", ".join(map(str, g.versions)) or "nothing reported"
        click.echo(f"Live gateway {printable(g.gateway_id)}: holds {held}")
