"""Tests of gateway.app.daemon.init_home and its first admin, on a real state
directory (SQLite store, master key, client config under a temporary path)."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app.daemon import advertised_url, init_home
from gateway.config import STORE_FILE, GatewaySettings
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


def test_the_advertised_url_is_the_setting_else_the_first_public_host_else_the_api_address() -> (
    None
):
    """What `pam login` is told to fail over to: never an any-address."""
    base = GatewaySettings(api_token_sha256="0" * 64, api_host="10.0.0.5", api_port=7745)
    chosen = base.model_copy(update={"advertise_url": "https://pam.example/", "api_port": 1})
    assert advertised_url(chosen, tls=False) == "https://pam.example"
    named = base.model_copy(update={"public_hosts": ["gw-2.example", "10.0.0.5"]})
    assert advertised_url(named, tls=True) == "https://gw-2.example:7745"
    assert advertised_url(base, tls=False) == "http://10.0.0.5:7745"
    v6 = base.model_copy(update={"api_host": "fd00::5"})
    assert advertised_url(v6, tls=True) == "https://[fd00::5]:7745"
    for anywhere in ("0.0.0.0", "::"):  # noqa: S104
        everywhere = base.model_copy(update={"api_host": anywhere})
        assert advertised_url(everywhere, tls=True) == f"https://{socket.getfqdn()}:7745"
