"""The ``pam`` commands, one module per area, registered by :mod:`cli.main`.

Each module holds one click group (or command) and talks to the daemon only
through the typed :class:`cli.client.ApiClient`; rendering lives in
:mod:`cli.render` and :mod:`cli.review`. Errors are raised, never printed here:
the root group turns them into one line on stderr.
"""

from __future__ import annotations

import sys

import click

from cli.client import ApiClient

#: ``--json``: the API's answer as JSON on stdout, for scripts.
json_option = click.option("--json", "as_json", is_flag=True)


def api_client() -> ApiClient:
    """A client for the daemon named by the client config ($PAM_CONFIG).

    A caller of the root group may pass a client factory as click's ``obj``
    (the unit tests do, with an in-memory transport).
    """
    make = click.get_current_context().find_root().obj
    if make is None:
        return ApiClient()
    client = make()
    assert isinstance(client, ApiClient)
    return client


def read_password(password_stdin: bool, prompt: str, *, confirm: bool = True) -> str:
    """A password from the first line of stdin, or a no-echo prompt (never argv)."""
    if password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    elif sys.stdin.isatty():
        password = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    else:
        raise click.UsageError("no terminal to prompt for the password; use --password-stdin")
    if not password:
        raise click.UsageError("the password is empty")
    return password
