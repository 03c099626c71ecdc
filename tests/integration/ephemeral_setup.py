"""Setting up ephemeral accounts (a database role per grant) for the tests that use them.

A template role (what a person may do), a rotation role (CREATEROLE) with
``pam resource set-rotation``, and an ephemeral account on resource ``prod``;
each test makes its own, never touching the fixture's roles.
"""

from __future__ import annotations

import os
from typing import Any

from conftest import APP_DATABASE
from harness import Gateway, unique

from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident, sql_literal

RESOURCE = "prod"


def make_template(pg: TempCluster) -> str:
    """A NOLOGIN role that may connect to the app database and create tables in public."""
    name = unique("tmpl")
    pg.admin_sql(
        f"CREATE ROLE {sql_ident(name)} NOLOGIN;\n"
        f"GRANT CONNECT ON DATABASE {APP_DATABASE} TO {sql_ident(name)};"
    )
    pg.admin_sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {sql_ident(name)};", APP_DATABASE)
    return name


def make_rotator(pg: TempCluster, *, createrole: bool = True) -> tuple[str, str]:
    name, password = unique("rotator"), "rot-" + os.urandom(9).hex()
    options = "LOGIN CREATEROLE" if createrole else "LOGIN"
    pg.admin_sql(
        f"CREATE ROLE {sql_ident(name)} {options} PASSWORD {sql_literal(password)};\n"
        f"GRANT CONNECT ON DATABASE {APP_DATABASE} TO {sql_ident(name)};",
        redact=[password],
    )
    return name, password


def set_rotation(gateway: Gateway, rotator: tuple[str, str], *args: str) -> Any:
    return gateway.cli(
        "resource",
        "set-rotation",
        RESOURCE,
        "--username",
        rotator[0],
        "--password-stdin",
        *args,
        input=rotator[1] + "\n",
        check=False,
    )


def add_ephemeral(gateway: Gateway, account: str, template: str, *args: str) -> Any:
    return gateway.cli(
        "account",
        "add",
        RESOURCE,
        account,
        "--ephemeral",
        "--template",
        template,
        *args,
        check=False,
    )


def prepared(gateway: Gateway, pg: TempCluster, *, owner: str | None = None) -> tuple[str, str]:
    """A rotation role (and *owner* as the REASSIGN target) and an ephemeral
    account ``eph``; (template, rotator)."""
    template = make_template(pg)
    rotator = make_rotator(pg)
    extra = []
    if owner is not None:
        pg.admin_sql(f"GRANT {sql_ident(owner)} TO {sql_ident(rotator[0])}")
        extra = ["--reassign-to", owner]
    assert set_rotation(gateway, rotator, *extra).returncode == 0
    added = add_ephemeral(gateway, "eph", template)
    assert added.returncode == 0, added.stderr
    return template, rotator[0]


def role_exists(pg: TempCluster, role: str) -> bool:
    return pg.admin_sql(f"SELECT count(*) FROM pg_roles WHERE rolname = {sql_literal(role)}") == "1"
