"""`pam demo`: a throwaway PostgreSQL, gateway and access session (see :mod:`cli.demo`)."""

from __future__ import annotations

import sys

import click

from cli.access import parse_duration


@click.command("demo")
@click.option("--duration", default="1h", show_default=True)
def demo(duration: str) -> None:
    """Throwaway PostgreSQL + gateway + access session, torn down on Ctrl+C."""
    # Imported here: the demo pulls in the daemon and the test cluster.
    from cli.demo import run_demo

    sys.exit(run_demo(parse_duration(duration)))
