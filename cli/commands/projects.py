"""`pam project show|set`: what a project asks beyond its policies.

Today one setting: whether approving a request of the project needs the
approver's second factor (``--approval-mfa``).
"""

from __future__ import annotations

import click

from cli.client import ProjectJson
from cli.commands import api_client, json_option
from cli.render import key_values, local_time, print_json


@click.group("project")
def project() -> None:
    """Project settings (admins of the project)."""


def _show(settings: ProjectJson) -> None:
    updated = "never (defaults)"
    if settings["updated_at"]:
        updated = f"{local_time(settings['updated_at'])} by {settings['updated_by']}"
    key_values(
        [
            ("project", settings["project"]),
            ("approvals need MFA", "yes" if settings["approval_mfa"] else "no"),
            ("updated", updated),
        ]
    )


@project.command("show")
@click.argument("name")
@json_option
def project_show(name: str, as_json: bool) -> None:
    """A project's settings."""
    with api_client() as client:
        settings = client.project(name)
    if as_json:
        print_json(settings)
    else:
        _show(settings)


@project.command("set")
@click.argument("name")
@click.option(
    "--approval-mfa/--no-approval-mfa",
    "approval_mfa",
    default=None,
    help="Approving a request of this project needs the approver's second factor.",
)
@json_option
def project_set(name: str, approval_mfa: bool | None, as_json: bool) -> None:
    """Change a project's settings."""
    if approval_mfa is None:
        raise click.UsageError("nothing to set: give --approval-mfa or --no-approval-mfa")
    with api_client() as client:
        settings = client.set_project(name, approval_mfa=approval_mfa)
    if as_json:
        print_json(settings)
    else:
        _show(settings)


__all__ = ["project"]
