"""The ``pam`` command: the root group, its global options and its error handling.

The commands live in :mod:`cli.commands`, one module per area, over the typed
control API client (:mod:`cli.client`); this module only assembles them.

Invariants: every failure is one line on stderr and a non-zero exit (1 for
errors, 2 for usage, 130 for Ctrl+C); only ``--debug`` shows a traceback.
Passwords are read from a no-echo prompt or stdin, never from argv, and never
printed. Logging is configured by the one command that logs, ``pam gateway
run`` (its ``--log-format``/``--log-level``); the client commands write only
their output and that one error line.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

import click

from cli.client import ApiError
from cli.commands import (
    access,
    accounts,
    audit,
    demo,
    gateway,
    grants,
    identity,
    mfa,
    policies,
    projects,
    requests,
    resources,
    sessions,
    sso,
    webhooks,
)
from cli.render import printable
from gateway.errors import GatewayError


class PamGroup(click.Group):
    """Turns every error into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:
            # click's own format is four lines (usage, try, blank, error): one here,
            # with click's exit code (2 for usage errors).
            _fail(ctx, exc.format_message(), None, exc, code=exc.exit_code)
        except GatewayError as exc:
            _fail(ctx, exc.message, exc.hint, exc)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            _fail(ctx, f"unexpected error: {type(exc).__name__}: {exc}", None, exc)


def _fail(
    ctx: click.Context, message: str, hint: str | None, exc: BaseException, code: int = 1
) -> None:
    if ctx.find_root().params.get("debug"):
        traceback.print_exception(exc, file=sys.stderr)
    # Messages can quote what a server or a database user wrote: escaped.
    line = f"error: {printable(message)}"
    if hint:
        line += f" (hint: {printable(hint)})"
    click.echo(line, err=True)
    ctx.exit(code)


@click.group(cls=PamGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory for `pam gateway` commands (their own --home wins;"
    " default: $PAM_HOME or the per-user data directory).",
)
@click.version_option(package_name="pam-gateway", prog_name="pam")
def cli(debug: bool, home: Path | None) -> None:
    """pam: just-in-time, audited access to PostgreSQL."""


for _command in (
    gateway.gateway,
    resources.resource,
    accounts.account,
    access.db,
    sessions.sessions,
    grants.grant,
    audit.audit,
    demo.demo,
    identity.login,
    identity.logout,
    identity.whoami,
    identity.user,
    identity.token,
    policies.policy,
    requests.requests,
    sso.sso,
    webhooks.webhook,
    mfa.mfa,
    projects.project,
):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="pam")


__all__ = ["ApiError", "cli", "main"]
