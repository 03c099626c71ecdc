"""The ``pam`` command: thin click commands over the gateway's control API.

Every failure is one line on stderr and a non-zero exit (1 for errors, 2 for
usage); ``--debug`` shows the traceback. Passwords are read from a no-echo
prompt or stdin, never from argv, and never printed.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from cli.access import hold_access, parse_duration
from cli.client import ApiClient, ApiError, seg
from cli.render import (
    console,
    key_values,
    local_time,
    print_json,
    table,
)
from cli.review import (
    API_MAX_PAGE,
    DEFAULT_PAGE_SIZE,
    SESSION_COLUMNS,
    ExportWriter,
    When,
    closed_pipe_ends_quietly,
    export_sessions,
    iso,
    iter_audit_pages,
    iter_sessions,
    paging,
    problem_line,
    search_table,
    session_rows,
    show_timeline,
    statement_page,
)
from gateway.audit.records import AUDIT_STATUSES
from gateway.config import DEFAULT_API_PORT, resolve_home
from gateway.errors import GatewayError

SSL_MODES = ["disable", "prefer", "require", "verify-ca", "verify-full"]


class PamGroup(click.Group):
    """Turns every error into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except GatewayError as exc:
            _fail(ctx, exc.message, exc.hint, exc)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            _fail(ctx, f"unexpected error: {type(exc).__name__}: {exc}", None, exc)


def _fail(ctx: click.Context, message: str, hint: str | None, exc: BaseException) -> None:
    if ctx.find_root().params.get("debug"):
        traceback.print_exception(exc, file=sys.stderr)
    line = f"error: {message}"
    if hint:
        line += f" (hint: {hint})"
    click.echo(line, err=True)
    ctx.exit(1)


@click.group(cls=PamGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="pam-gateway", prog_name="pam")
def cli(debug: bool) -> None:
    """pam: just-in-time, audited access to PostgreSQL."""


def _client() -> ApiClient:
    return ApiClient()


# --- gateway -------------------------------------------------------------------


@cli.group()
def gateway() -> None:
    """Set up and run the gateway daemon."""


home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory (default: $PAM_HOME or the per-user data directory).",
)


@gateway.command("init")
@home_option
@click.option(
    "--api-port", type=click.IntRange(1, 65535), default=DEFAULT_API_PORT, show_default=True
)
@click.option(
    "--force", is_flag=True, help="Issue a new API token for an existing state directory."
)
def gateway_init(home: Path | None, api_port: int, force: bool) -> None:
    """Create the state directory, master key, store and API token."""
    from gateway.app.daemon import init_home

    result = init_home(resolve_home(home), api_port=api_port, force=force)
    console.print(f"Initialised pam state in {result.home}")
    console.print(f"Client configuration (API token, mode 0600): {result.client_config}")
    if force:
        console.print("A running daemon keeps the old token until it is restarted.")
    console.print(f"Start the daemon with: pam gateway run --home {result.home}")


@gateway.command("run")
@home_option
@click.option(
    "--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
def gateway_run(home: Path | None, log_format: str, log_level: str) -> None:
    """Run the gateway daemon in the foreground (stops on SIGTERM/SIGINT)."""
    from gateway.app import daemon
    from gateway.app.logging import configure_logging

    configure_logging("json" if log_format == "json" else "console", log_level)
    with asyncio.Runner(loop_factory=daemon.event_loop_factory()) as runner:
        runner.run(daemon.run(resolve_home(home), log_format=log_format, log_level=log_level))


# --- resources -------------------------------------------------------------------


@cli.group()
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
@click.option("--json", "as_json", is_flag=True)
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
    body = {
        "name": name,
        "host": host,
        "port": port,
        "database": database,
        "ssl_mode": ssl_mode,
        "ca_cert": ca_cert.read_text() if ca_cert else None,
    }
    with _client() as client:
        created = client.post("/v1/resources", body)
    if as_json:
        print_json(created)
    else:
        console.print(
            f"Resource {created['name']} added ({host}:{port}/{database}, ssl {ssl_mode})."
        )


def _resource_rows(resources: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["name"],
            f"{r['host']}:{r['port']}",
            r["database"],
            r["ssl_mode"],
            "custom" if r.get("ca_cert") else "system",
            local_time(r["created_at"]),
        ]
        for r in resources
    ]


@resource.command("list")
@click.option("--json", "as_json", is_flag=True)
def resource_list(as_json: bool) -> None:
    """List resources."""
    with _client() as client:
        resources = client.get("/v1/resources")
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
@click.option("--json", "as_json", is_flag=True)
def resource_show(name: str, as_json: bool) -> None:
    """Show one resource and its accounts."""
    with _client() as client:
        res = client.get(f"/v1/resources/{seg(name)}")
        accounts = client.get("/v1/accounts", resource=name)
    if as_json:
        print_json({**res, "accounts": accounts})
        return
    key_values(
        [
            ("name", res["name"]),
            ("address", f"{res['host']}:{res['port']}"),
            ("database", res["database"]),
            ("ssl mode", res["ssl_mode"]),
            ("CA", "custom (PEM stored)" if res.get("ca_cert") else "system trust store"),
            ("created", local_time(res["created_at"])),
            (
                "accounts",
                ", ".join(f"{a['name']} (user {a['username']})" for a in accounts) or "none",
            ),
        ]
    )


@resource.command("remove")
@click.argument("name")
def resource_remove(name: str) -> None:
    """Remove a resource and its accounts."""
    with _client() as client:
        client.delete(f"/v1/resources/{seg(name)}")
    console.print(f"Resource {name} removed.")


@resource.command("verify")
@click.argument("name")
@click.option("--account", default=None, help="Verify only this account (default: all).")
@click.option("--json", "as_json", is_flag=True)
def resource_verify(name: str, account: str | None, as_json: bool) -> None:
    """Connect upstream with the stored credentials and report the outcome."""
    with _client() as client:
        results = client.request(
            "POST", f"/v1/resources/{seg(name)}/verify", params={"account": account}, timeout=120
        )
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console.print(
                    f"[green]ok[/]  {r['resource']}/{r['account']} at {r['address']}:"
                    f" PostgreSQL {r['server_version']}, {r['tls_version'] or 'no TLS'}"
                    f"{' ' + r['cipher'] if r['cipher'] else ''}, auth {r['auth_method']},"
                    f" {r['latency_ms']} ms"
                )
            else:
                hint = f" (hint: {r['hint']})" if r.get("hint") else ""
                click.echo(
                    f"FAILED  {r['resource']}/{r['account']} at {r['address']}:"
                    f" [{r['error_kind']}, {r['error_sqlstate']}] {r['error']}{hint}",
                    err=True,
                )
    if not all(r["ok"] for r in results):
        sys.exit(1)


# --- accounts --------------------------------------------------------------------


@cli.group()
def account() -> None:
    """Store database accounts (credentials) for resources."""


def _read_password(password_stdin: bool, prompt: str) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    elif sys.stdin.isatty():
        password = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    else:
        raise click.UsageError("no terminal to prompt for the password; use --password-stdin")
    if not password:
        raise click.UsageError("the password is empty")
    return password


@account.command("add")
@click.argument("resource_name", metavar="RESOURCE")
@click.argument("name")
@click.option("--username", required=True, help="The PostgreSQL role to log in as.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@click.option("--json", "as_json", is_flag=True)
def account_add(
    resource_name: str, name: str, username: str, password_stdin: bool, as_json: bool
) -> None:
    """Add an account; the password is prompted for (or read from stdin) and stored encrypted."""
    password = _read_password(password_stdin, f"Password for {username}")
    with _client() as client:
        created = client.post(
            f"/v1/resources/{seg(resource_name)}/accounts",
            {"name": name, "username": username, "password": password},
        )
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
    password = _read_password(password_stdin, "New password")
    with _client() as client:
        client.post(
            f"/v1/resources/{seg(resource_name)}/accounts/{seg(name)}/rotate",
            {"password": password},
        )
    console.print(f"Password of {resource_name}/{name} replaced.")


@account.command("list")
@click.option("--resource", "resource_name", default=None)
@click.option("--json", "as_json", is_flag=True)
def account_list(resource_name: str | None, as_json: bool) -> None:
    """List accounts (never their passwords)."""
    with _client() as client:
        accounts = client.get("/v1/accounts", resource=resource_name)
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
    with _client() as client:
        client.delete(f"/v1/resources/{seg(resource_name)}/accounts/{seg(name)}")
    console.print(f"Account {resource_name}/{name} removed.")


# --- access ------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Get access to a database."""


@db.command("access")
@click.option("--resource", "resource_name", required=True)
@click.option("--account", "account_name", required=True)
@click.option(
    "--duration",
    default="1h",
    show_default=True,
    help="How long the grant lasts: 1h, 30m, 1h30m, 90s.",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Local port (default: a free one)."
)
def db_access(resource_name: str, account_name: str, duration: str, port: int | None) -> None:
    """Open a time-boxed local port to a resource, as an account, with no password."""
    seconds = parse_duration(duration)
    with _client() as client:
        code = hold_access(
            client,
            resource=resource_name,
            account=account_name,
            duration_seconds=seconds,
            port=port,
        )
    sys.exit(code)


# --- sessions ------------------------------------------------------------------------


@cli.group()
def sessions() -> None:
    """Review access sessions: their connections and every statement."""


@sessions.command("list")
@click.option("--resource", "resource_name", default=None, help="Only sessions on this resource.")
@click.option("--account", "account_name", default=None, help="Only sessions as this account.")
@click.option("--user", "requester", default=None, help="Only sessions of this requester.")
@click.option("--since", type=When(), default=None, help="Started at or after: 7d, 12h, ISO.")
@click.option("--until", type=When(), default=None, help="Started before: 7d, 12h, ISO.")
@click.option("--active", is_flag=True, help="Only sessions that have not ended.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions_list(
    resource_name: str | None,
    account_name: str | None,
    requester: str | None,
    since: datetime | None,
    until: datetime | None,
    active: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List access sessions, newest first.

    WHEN is relative (7d, 12h, 30m: that long ago) or an ISO-8601 date or
    datetime (local time unless it names a zone).
    """
    with _client() as client:
        items = client.get(
            "/v1/sessions",
            active=True if active else None,
            limit=limit,
            resource=resource_name,
            account=account_name,
            requester=requester,
            since=iso(since),
            until=iso(until),
        )
    if as_json:
        print_json(items)
    else:
        table(None, SESSION_COLUMNS, session_rows(items))


@sessions.command("show")
@click.argument("session_id")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--page-size",
    type=click.IntRange(1, API_MAX_PAGE),
    default=DEFAULT_PAGE_SIZE,
    show_default=True,
    help="Statements per page.",
)
@click.option("--all", "show_all", is_flag=True, help="Every statement, not one page.")
@click.option("--json", "as_json", is_flag=True)
def sessions_show(
    session_id: str, page: int, page_size: int, show_all: bool, as_json: bool
) -> None:
    """Show a session: its connections, then its statements in order (paged)."""
    with _client() as client:
        detail = client.get(f"/v1/sessions/{seg(session_id)}")
        full_id = detail["session"]["id"]
        view = paging(int(detail.get("statements") or 0), None if show_all else page, page_size)
        first = None if show_all else statement_page(client, full_id, page, page_size)
        if not as_json:
            with closed_pipe_ends_quietly():
                show_timeline(console, client, detail, view, first)
            return
        if first is None:
            first = [r for p in iter_audit_pages(client, full_id, kind="statement") for r in p]
    print_json(
        {
            "session": detail["session"],
            "connections": detail["connections"],
            "live_connections": detail["live_connections"],
            "statement_count": view.total,
            "page": view.page,
            "pages": view.pages,
            "page_size": view.page_size,
            "statements": first,
        }
    )


@sessions.command("export")
@click.argument("session_id", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("--since", type=When(), default=None, help="Sessions started at or after WHEN.")
@click.option("--until", type=When(), default=None, help="Sessions started before WHEN.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write here instead of stdout.",
)
def sessions_export(
    session_id: str | None,
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    output: Path | None,
) -> None:
    """Export every audit record of a session, or of every session started in a window.

    One JSON object per line (jsonl) or CSV with a fixed header (parameters and
    detail as JSON text). Streams page by page, oldest session first.
    """
    if session_id is not None and (since is not None or until is not None):
        raise click.UsageError("--since/--until select sessions; leave them out with SESSION_ID")
    with _client() as client:
        if output is None:
            with closed_pipe_ends_quietly():
                writer = ExportWriter(sys.stdout, fmt)
                export_sessions(client, writer, session_id, since=since, until=until)
            return
        with output.open("w", encoding="utf-8", newline="") as handle:
            writer = ExportWriter(handle, fmt)
            count = export_sessions(client, writer, session_id, since=since, until=until)
    console.print(
        f"Exported {writer.records} records of {count} session{'s' if count != 1 else ''}"
        f" to {output}."
    )


# --- audit ---------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Search the statement audit trail and check that it is intact."""


@audit.command("search")
@click.argument("text", required=False)
@click.option("--since", type=When(), default=None, help="At or after WHEN: 7d, 12h, ISO.")
@click.option("--until", type=When(), default=None, help="Before WHEN.")
@click.option("--resource", "resource_name", default=None)
@click.option("--account", "account_name", default=None)
@click.option("--user", "requester", default=None, help="The requester of the session.")
@click.option("--session", "session_id", default=None, help="Session id or prefix.")
@click.option("--status", type=click.Choice(sorted(AUDIT_STATUSES)), default=None)
@click.option("--limit", type=click.IntRange(1, API_MAX_PAGE), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def audit_search(
    text: str | None,
    since: datetime | None,
    until: datetime | None,
    resource_name: str | None,
    account_name: str | None,
    requester: str | None,
    session_id: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Find statements whose SQL contains TEXT (case-insensitive), newest first."""
    with _client() as client:
        records = client.get(
            "/v1/audit/search",
            q=text,
            since=iso(since),
            until=iso(until),
            resource=resource_name,
            account=account_name,
            requester=requester,
            session=session_id,
            status=status,
            limit=limit,
        )
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("No matching records.")
        return
    console.print(search_table(records))
    if len(records) == limit:
        console.print(f"Showing the newest {limit} matches; use --limit for more.")


@audit.command("verify")
@click.argument("session_id", required=False)
@click.option("--json", "as_json", is_flag=True)
def audit_verify(session_id: str | None, as_json: bool) -> None:
    """Recompute the hash chain of one session (or all); exit 1 naming each problem."""
    with _client() as client:
        checked = 1 if session_id else sum(1 for _ in iter_sessions(client))
        result = client.request(
            "POST", "/v1/audit/verify", params={"session": session_id}, timeout=600
        )
    problems = result["problems"]
    if as_json:
        print_json({**result, "sessions_checked": checked})
    elif not problems:
        console.print(f"audit trail intact: {checked} session{'s' if checked != 1 else ''} checked")
    else:
        for problem in problems:
            click.echo(problem_line(problem))
    if problems:
        sessions_hit = len({p["session_id"] for p in problems})
        click.echo(
            f"error: the audit trail is not intact: {len(problems)}"
            f" problem{'s' if len(problems) != 1 else ''} in {sessions_hit}"
            f" session{'s' if sessions_hit != 1 else ''}",
            err=True,
        )
        sys.exit(1)


# --- demo ----------------------------------------------------------------------------


@cli.command("demo")
@click.option("--duration", default="1h", show_default=True)
def demo(duration: str) -> None:
    """Throwaway PostgreSQL + gateway + access session, torn down on Ctrl+C."""
    from cli.demo import run_demo

    sys.exit(run_demo(parse_duration(duration)))


def main() -> None:
    cli(prog_name="pam")


__all__ = ["ApiError", "cli", "main"]
