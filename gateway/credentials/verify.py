"""Verify: sign in to a resource with its stored accounts and report what happened.

The control API's ``/v1/resources/{name}/verify`` answers with
:class:`VerifyResult` itself, so its fields and their JSON are the API's: keep
them stable. A failure is a result (``ok=False`` with the error's kind, SQLSTATE,
message and hint), never a raised error; the password never appears in one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.credentials.ports import AccountStore, StoreThread
from gateway.credentials.targets import Credentials
from gateway.errors import InvalidRequest, UpstreamError
from gateway.net.relay import close_writer
from gateway.net.upstream import connect_upstream
from gateway.protocol import messages


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    resource: str
    account: str
    address: str
    ssl_mode: str
    latency_ms: float | None = None
    server_version: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    auth_method: str | None = None
    error_kind: str | None = None
    error_sqlstate: str | None = None
    error: str | None = None
    hint: str | None = None


async def verify(
    credentials: Credentials,
    store: AccountStore,
    db: StoreThread,
    resource: str,
    account: str | None,
    *,
    connect_timeout: float,
    ephemeral: Callable[[str, str], Awaitable[VerifyResult]] | None = None,
) -> list[VerifyResult]:
    """Sign in with *account* (or each of the resource's accounts), one at a time;
    an ephemeral account (no password) is verified by *ephemeral* instead."""
    records = (
        [await db(store.get_account, resource, account)]
        if account
        else list(await db(store.list_accounts, resource))
    )
    res = await db(store.get_resource, resource)
    if not records:
        raise InvalidRequest(
            f"resource {resource!r} has no accounts to verify with",
            hint=f"add one with `pam account add {resource} NAME --username USER`",
        )
    results = []
    for record in records:
        if ephemeral is not None and record.template_role is not None:
            results.append(await ephemeral(res.name, record.name))
        else:
            results.append(await _verify_one(credentials, res.name, record.name, connect_timeout))
    return results


async def _verify_one(
    credentials: Credentials, resource: str, account: str, connect_timeout: float
) -> VerifyResult:
    target = await credentials.upstream_target(resource, account)
    base = {
        "resource": resource,
        "account": account,
        "address": target.address,
        "ssl_mode": target.ssl_mode,
    }
    try:
        upstream = await connect_upstream(
            target, params={"application_name": "pam verify"}, timeout=connect_timeout
        )
    except UpstreamError as exc:
        return VerifyResult(
            ok=False,
            error_kind=exc.kind,
            error_sqlstate=exc.sqlstate,
            error=exc.message,
            hint=_next_step(exc, resource, account),
            **base,  # type: ignore[arg-type]
        )
    upstream.writer.write(messages.terminate())
    await close_writer(upstream.writer)
    return VerifyResult(
        ok=True,
        latency_ms=round(upstream.connect_ms, 1),
        server_version=upstream.server_version,
        tls_version=upstream.tls_version,
        cipher=upstream.cipher,
        auth_method=upstream.handshake.auth_method,
        **base,
    )


def _next_step(exc: UpstreamError, resource: str, account: str) -> str | None:
    """The hint for someone who is already verifying: the step after this one.

    An upstream error's hint is written for a client's connection, where running
    `pam resource verify` is the next step; here it is the command just run.
    """
    if exc.kind == "auth":
        return (
            "if the password changed on the server, store the new one with"
            f" `pam account rotate {resource} {account}`"
        )
    return exc.hint
