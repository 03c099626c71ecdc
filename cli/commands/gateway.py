"""`pam gateway`: set up a state directory and run the daemon in the foreground.

The only commands that work on the state directory itself rather than through
the control API. ``--home`` here wins over the root's ``pam --home``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from cli.commands import read_password
from cli.render import console
from gateway.config import DEFAULT_API_PORT, resolve_home


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
    from gateway.app import daemon
    from gateway.app.logging import configure_logging

    configure_logging("json" if log_format == "json" else "console", log_level)
    with asyncio.Runner(loop_factory=daemon.event_loop_factory()) as runner:
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
