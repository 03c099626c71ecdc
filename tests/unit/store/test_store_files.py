"""Tests of the files the SQLite store leaves on disk: who may read them.

The store file holds sealed passwords and the whole audit trail (SQL text,
parameters), so it and its WAL and shared-memory files are private to the
gateway's user, like ``master.key``.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.credentials.secretbox import SecretBox
from gateway.store import Store


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The common umask 022, under which a plain create gives 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


@pytest.mark.usefixtures("permissive_umask")
def test_a_new_sqlite_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "pam.db"
    with Store.open(f"sqlite:///{db}", SecretBox(secrets.token_bytes(32))) as store:
        store.add_resource("db1", "db.example.com", 5432, "app")
        # While the store is open, WAL mode keeps both side files in place.
        modes = {
            path.name: _mode(path)
            for path in (db, db.with_name("pam.db-wal"), db.with_name("pam.db-shm"))
        }
    assert modes == {"pam.db": "0600", "pam.db-wal": "0600", "pam.db-shm": "0600"}


@pytest.mark.usefixtures("permissive_umask")
def test_an_existing_store_file_keeps_its_mode(tmp_path: Path) -> None:
    # The operator's choice for a file that already exists is theirs to make.
    db = tmp_path / "pam.db"
    with Store.open(f"sqlite:///{db}", SecretBox(secrets.token_bytes(32))):
        pass
    db.chmod(0o640)
    with Store.open(f"sqlite:///{db}", SecretBox(secrets.token_bytes(32))) as store:
        store.add_resource("db1", "db.example.com", 5432, "app")
    assert _mode(db) == "0640"
