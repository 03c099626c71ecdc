"""Tests of gateway.app.daemon.init_home and its first admin, on a real state
directory (SQLite store, master key, client config under a temporary path)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app.daemon import init_home
from gateway.config import STORE_FILE
from gateway.credentials.secretbox import SecretBox, load_master_key
from gateway.errors import ConfigError
from gateway.identity.hashing import token_digest
from gateway.store import Store


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "client.json"
    monkeypatch.setenv("PAM_CONFIG", str(path))
    return path


def open_store(home: Path) -> Store:
    return Store.open(
        f"sqlite:///{home / STORE_FILE}", SecretBox(load_master_key(home / "master.key"))
    )


def local_principal(home: Path, config: Path) -> str | None:
    token = json.loads(config.read_text())["token"]
    with open_store(home) as store:
        found = store.principal_by_token(token_digest(token), now=datetime.now(UTC))
    return None if found is None else found[0].name


def test_init_makes_an_admin_whose_local_token_works(tmp_path: Path, config: Path) -> None:
    home = tmp_path / "home"
    init_home(home, api_port=7001, admin="boss")
    assert local_principal(home, config) == "boss"
    init_home(home, api_port=7001, admin="boss", force=True)
    assert local_principal(home, config) == "boss"


def test_init_force_refuses_a_disabled_admin_rather_than_write_a_dead_token(
    tmp_path: Path, config: Path
) -> None:
    home = tmp_path / "home"
    init_home(home, api_port=7001, admin="boss")
    with open_store(home) as store:
        store.disable_principal("boss")
    before = config.read_text()
    with pytest.raises(ConfigError, match="user 'boss' is disabled") as refused:
        init_home(home, api_port=7001, admin="boss", force=True)
    assert "--admin" in (refused.value.hint or "")
    assert config.read_text() == before
    # The way back: another admin, made by whoever holds the state directory.
    init_home(home, api_port=7001, admin="boss2", force=True)
    assert local_principal(home, config) == "boss2"
