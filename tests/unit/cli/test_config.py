"""Tests of the client config's permissions: the file holds the control API token.

A config other users can read (or write: they could point the CLI, and its
token, at another server) is repaired to 0600 with a
one-line warning when it belongs to the user running the CLI, and refused with
a one-line error and a hint when it belongs to someone else. The token never
appears in either.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import pytest

from gateway.config import ClientConfig, load_client_config
from gateway.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"api_url": "http://127.0.0.1:7745", "token": token}))
    monkeypatch.setenv("PAM_CONFIG", str(path))
    return path


def test_a_private_config_loads_without_a_word(
    config_path: Path, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path.chmod(0o600)
    assert load_client_config() == ClientConfig(api_url="http://127.0.0.1:7745", token=token)
    assert capsys.readouterr() == ("", "")
    assert mode(config_path) == 0o600


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o620], ids=lambda m: f"{m:04o}")
def test_an_own_config_others_can_read_or_write_is_repaired_to_0600_with_one_warning_line(
    config_path: Path, token: str, loose: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path.chmod(loose)

    assert load_client_config().token == token

    assert mode(config_path) == 0o600
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"warning: {config_path} was open to other users (mode {loose:04o})")
    assert "0600" in lines[0]
    assert token not in err


def test_a_config_of_another_user_that_others_can_read_is_refused_with_a_hint(
    config_path: Path, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path.chmod(0o644)
    owner = config_path.stat().st_uid
    # Run as someone else: the file is not ours to repair.
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)

    with pytest.raises(ConfigError) as raised:
        load_client_config()

    error = raised.value
    assert error.message == (
        f"{config_path} holds the API token and is open to other users (mode 0644)"
    )
    assert error.hint == f"its owner can make it private with `chmod 600 {config_path}`"
    assert token not in error.message + (error.hint or "")
    assert mode(config_path) == 0o644
