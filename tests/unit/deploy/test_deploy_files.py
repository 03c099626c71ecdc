"""deploy/ checked offline with the tools there are (issue 17, point 5).

* The systemd unit: ``systemd-analyze verify`` (the ExecStart binary aside: pam
  is not installed under /opt here) and ``systemd-analyze security`` at most 2.0.
* The Kubernetes manifests: ``kubectl kustomize`` builds them (no cluster needed;
  ``kubectl --dry-run=client`` would still ask a server for its API groups), then
  every object is checked here: the kinds the issue asks for, probes on
  /healthz and /readyz, a non-root read-only container, selectors that match the
  pods, and the ConfigMap's gateway.json valid as pam's own settings.
* The compose file and the Containerfile: parsed and checked here (no container
  engine runs here; hadolint when it is installed).

YAML is read through ``yq`` (Debian's, a jq wrapper) into JSON: the project has
no YAML library of its own. .ci/run installs yq and kubectl (kubernetes-client);
a test skips, naming the tool, only where one is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewaySettings

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
UNIT = DEPLOY / "pam-gateway.service"
KUBERNETES = DEPLOY / "kubernetes"
MAX_EXPOSURE = 2.0
REQUIRED_KINDS = {
    "Deployment",
    "Service",
    "Secret",
    "ConfigMap",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
LABELS = {"app.kubernetes.io/name": "pam-gateway"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, input=input, timeout=60)


def yaml_documents(text: str) -> list[Any]:
    """Every document of *text* (YAML), through yq, as JSON values."""
    result = run(tool("yq"), "-c", ".", input=text)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# --- systemd --------------------------------------------------------------------------


def test_the_systemd_unit_verifies() -> None:
    result = run(tool("systemd-analyze"), "verify", str(UNIT))
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/pam/.venv/bin/pam is not executable" not in line
    ]
    assert problems == []


def test_the_systemd_unit_is_hardened() -> None:
    result = run(tool("systemd-analyze"), "security", "--offline=yes", str(UNIT))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


# --- Kubernetes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    result = run(tool("kubectl"), "kustomize", str(KUBERNETES))
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml_documents(result.stdout) if o is not None]
    for o in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(o), o
        assert o["kind"] == "Namespace" or o["metadata"].get("namespace") == "pam", o
    return {o["kind"]: o for o in objects}


def test_the_manifests_hold_every_kind_the_deployment_needs(
    manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(manifests) >= REQUIRED_KINDS


def test_the_gateway_pods_are_probed_non_root_and_read_only(
    manifests: dict[str, dict[str, Any]],
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/pam"]]
    assert volumes[mounts["/run/secrets/pam"]]["secret"]["secretName"] == "pam-gateway"
    config = volumes[mounts["/etc/pam"]]["configMap"]["name"]
    assert config == manifests["ConfigMap"]["metadata"]["name"]
    assert manifests["Deployment"]["spec"]["replicas"] >= 2


def test_selectors_match_the_gateway_pods(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]["spec"]
    pod_labels = deployment["template"]["metadata"]["labels"]
    selectors = [
        deployment["selector"]["matchLabels"],
        manifests["Service"]["spec"]["selector"],
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        manifests["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
        assert selector == LABELS


def test_the_secret_and_the_config_are_what_the_gateway_reads(
    manifests: dict[str, dict[str, Any]],
) -> None:
    secret = manifests["Secret"]["stringData"]
    # Every file the entrypoint copies from the Secret into the state directory,
    # and every key the pods read from it.
    entrypoint = (DEPLOY / "container" / "entrypoint.sh").read_text()
    copied = re.search(r"^for name in (.+); do$", entrypoint, re.MULTILINE)
    assert copied is not None
    assert set(copied.group(1).split()) == {
        "master.key",
        "gateway-ca.crt",
        "gateway-ca.key.sealed",
        "gateway-server.crt",
        "gateway-server.key.sealed",
    }
    assert set(copied.group(1).split()) <= set(secret)
    [container] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    read = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert read == {"PGPASSWORD"}
    assert read <= set(secret)
    settings = GatewaySettings.model_validate_json(manifests["ConfigMap"]["data"]["gateway.json"])
    assert settings.store_url.startswith("postgresql://")
    # the store's CA, named in store_url, is a file of the Secret's volume
    assert "sslrootcert=/run/secrets/pam/store-ca.crt" in settings.store_url
    assert "store-ca.crt" in secret
    assert settings.api_host == "0.0.0.0"  # noqa: S104 (a pod serves its own address)


# --- compose and the image ------------------------------------------------------------


def test_the_compose_file_runs_two_read_only_gateways_on_one_store() -> None:
    [compose] = yaml_documents((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"store", "sample", "init", "gateway-a", "gateway-b"} <= set(services)
    ids = set()
    for name in ("gateway-a", "gateway-b"):
        gateway = services[name]
        assert gateway["read_only"] is True
        assert gateway["cap_drop"] == ["ALL"]
        assert gateway["depends_on"]["store"]["condition"] == "service_healthy"
        assert gateway["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert any(v.endswith(":/var/lib/pam") for v in gateway["volumes"])
        ids.add(gateway["environment"]["PAM_GATEWAY_ID"])
    assert len(ids) == 2
    assert (DEPLOY / "compose" / "sample.sql").is_file()


def stages(containerfile: str) -> list[list[str]]:
    """The Containerfile's instructions (continuations joined), by stage."""
    text = re.sub(r"\\\n", " ", containerfile)
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    result: list[list[str]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_the_image_is_multi_stage_non_root_with_state_under_a_volume() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    build, runtime = stages(text)[-2:]
    assert build[0].endswith(" AS build")
    assert any(i.startswith("COPY --from=build ") for i in runtime)
    [user] = [i for i in runtime if i.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in {"0", "root"}
    assert 'VOLUME ["/var/lib/pam"]' in runtime
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(runtime)
    root = DEPLOY.parent
    for instruction in build + runtime:
        parts = instruction.split()
        if parts[0] == "COPY" and not any(p.startswith("--from=") for p in parts):
            sources = [p for p in parts[1:-1] if not p.startswith("--")]
            assert all((root / s).exists() for s in sources), instruction


def test_the_entrypoint_is_valid_shell() -> None:
    result = run("sh", "-n", str(DEPLOY / "container" / "entrypoint.sh"))
    assert result.returncode == 0, result.stderr


def test_hadolint_finds_nothing_in_the_containerfile() -> None:
    result = run(tool("hadolint"), str(DEPLOY / "Containerfile"))
    assert result.returncode == 0, result.stdout
