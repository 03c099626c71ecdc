"""/healthz, /readyz and /metrics of the control API, on a real SQLite store
and the daemon's own :class:`~gateway.app.gateway.Gateway` (no relay)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app.api import create_app
from gateway.app.gateway import Gateway
from gateway.config import GatewaySettings
from gateway.credentials.secretbox import SecretBox
from gateway.identity.hashing import new_token, token_digest
from gateway.identity.principals import ALL_PROJECTS, PrincipalKind, Role
from gateway.identity.service import TokenKind
from gateway.store import Store


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Gateway]:
    store = Store.open(f"sqlite:///{tmp_path / 'pam.db'}", SecretBox(b"k" * 32))
    service = Gateway(store, GatewaySettings(api_token_sha256="0" * 64, audit_enabled=False))
    await service.presence.start()
    yield service
    await service.presence.close()
    service.db.shutdown()
    store.close()


def _client(service: Gateway, host: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(service), client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway")


async def test_healthz_and_readyz_answer_200_on_a_healthy_gateway(service: Gateway) -> None:
    async with _client(service, "192.0.2.7") as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert (await http.get("/v1/health")).status_code == 200
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["failed"] == []
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "store": True,
        "lease": True,
        "audit": True,
    }
    assert body["checks"]["audit"]["detail"] == "off"


async def test_readyz_names_a_stale_lease_and_an_unreachable_store(service: Gateway) -> None:
    presence = service.presence
    now = presence.monotonic()
    presence.monotonic = lambda: now + presence.lease_seconds + 1
    service.store.close()  # every store call now fails
    async with _client(service) as http:
        ready = await http.get("/readyz")
        assert (await http.get("/healthz")).status_code == 200
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not_ready"
    assert body["failed"] == ["store", "lease"]
    assert body["checks"]["store"]["detail"] == "unreachable (ConfigError)"
    assert "sqlite" not in ready.text and str(service.settings.gateway_id) not in ready.text


async def test_metrics_are_open_on_loopback_and_need_a_token_from_elsewhere(
    service: Gateway,
) -> None:
    async with _client(service) as http:
        local = await http.get("/metrics")
    assert local.status_code == 200
    assert local.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(local.text)}
    assert {"pam_grants_live", "pam_connections", "pam_upstream_connect_seconds"} <= families
    async with _client(service, "192.0.2.7") as http:
        remote = await http.get("/metrics")
        forged = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert remote.status_code == 401
    assert forged.status_code == 401


def _token(service: Gateway, name: str, role: Role) -> str:
    store = service.store
    principal = store.add_principal(name, kind=PrincipalKind.MACHINE, roles={ALL_PROJECTS: role})
    token = new_token()
    store.add_token(
        principal.id, kind=TokenKind.MACHINE, digest=token_digest(token), expires_at=None
    )
    return token


async def test_from_elsewhere_an_auditor_reads_the_metrics_and_a_member_may_not(
    service: Gateway,
) -> None:
    auditor = _token(service, "prometheus", Role.AUDITOR)
    member = _token(service, "someone", Role.MEMBER)
    async with _client(service, "192.0.2.7") as http:
        allowed = await http.get("/metrics", headers={"Authorization": f"Bearer {auditor}"})
        refused = await http.get("/metrics", headers={"Authorization": f"Bearer {member}"})
    assert allowed.status_code == 200
    assert "pam_grants_live" in allowed.text
    assert refused.status_code == 403
    assert "may not read the metrics" in refused.json()["error"]["message"]
