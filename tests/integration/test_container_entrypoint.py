"""The image's entrypoint (deploy/container/entrypoint.sh), run here without a
container engine: from a settings directory (the ConfigMap) and a secrets
directory (the Secret) made by `pam gateway init`, it assembles an empty state
directory (its own gateway_id, the key at mode 0600, later key versions in
its ring) and runs a daemon that
answers the API with the first one's token, on the same store, logging JSON and
echoing no secret."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Gateway

from cli.client import ApiError
from gateway.app.daemon import default_admin_name
from gateway.credentials.secretbox import generate_master_key

pytestmark = pytest.mark.integration

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "container" / "entrypoint.sh"


def test_the_entrypoint_assembles_the_state_directory_and_runs_the_gateway(
    tmp_path: Path,
) -> None:
    seed = Gateway(tmp_path / "seed")
    seed.init()
    settings = json.loads((seed.home / "gateway.json").read_text())
    settings["store_url"] = f"sqlite:///{seed.home / 'pam.db'}"
    config = tmp_path / "config"
    config.mkdir()
    (config / "gateway.json").write_text(json.dumps(settings))
    # A rotated key's later version, as a Secret holds it (flat name), and a
    # name that is not one.
    generate_master_key(seed.home / "master-key-2.key")
    (seed.home / "master-key-x.key").write_text("not a version\n")
    home = tmp_path / "state"
    home.mkdir(mode=0o700)
    env = {
        **seed.env,
        "PAM_HOME": str(home),
        "PAM_CONFIG_DIR": str(config),
        "PAM_SECRETS_DIR": str(seed.home),
        "PAM_GATEWAY_ID": "pod-1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        with seed.api() as api:
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    api.get("/v1/health")
                    break
                except ApiError:
                    assert time.monotonic() < deadline, "the daemon did not answer"
                    time.sleep(0.2)
            # /v1/health is open to anyone: this call needs the first one's token.
            assert api.whoami()["name"] == default_admin_name()  # init's first admin
        assert json.loads((home / "gateway.json").read_text())["gateway_id"] == "pod-1"
        for name in ("gateway.json", "master.key", "gateway-ca.crt", "gateway-ca.key.sealed"):
            assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
        ring = home / "master.keys"
        assert sorted(p.name for p in ring.iterdir() if p.suffix == ".key") == ["2.key"]
        assert (ring / "2.key").read_bytes() == (seed.home / "master-key-2.key").read_bytes()
        assert stat.S_IMODE((ring / "2.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(ring.stat().st_mode) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    # Nothing the entrypoint copies is echoed (no `set -x`, no logged file contents).
    master_key = (seed.home / "master.key").read_bytes().strip()
    assert master_key
    assert master_key not in stdout
    assert master_key not in stderr
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert lines and all({"timestamp", "level", "event", "logger"} <= set(x) for x in lines)
