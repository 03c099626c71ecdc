"""Single sign-on with OpenID Connect: what the control API's ``/v1/sso`` routes call.

The gateway is the relying party (a confidential client): the CLI asks it to
start a sign-in and polls for the result, the browser goes to the identity
provider and comes back to the gateway's callback, and the gateway exchanges
the code, checks the ID token, finds or creates the principal and issues a
session token, as ``pam login`` with a password does. Because the CLI only
polls, the browser can be on another machine (a terminal over SSH).

Two ways to start, one way to finish:

* browser: :meth:`SsoService.start` makes the state, nonce and PKCE verifier
  and answers the provider's authorization URL;
* device (RFC 8628's user experience, done by the gateway, since providers
  differ in whether they offer it): :meth:`SsoService.start` answers a user
  code and the gateway's own verification page; when a person enters the code
  there, :meth:`SsoService.begin_device` makes the same authorization request
  and the browser is sent on to the provider.

Invariants:
* A sign-in attempt lives in this daemon's memory for :data:`ATTEMPT_SECONDS`
  at most (a restart forgets them: the person runs ``pam login`` again), at
  most :data:`MAX_ATTEMPTS` at once (the oldest are dropped) and
  :data:`MAX_ATTEMPTS_PER_ADDRESS` from one address. Its poll handle
  and its state are kept as SHA-256 digests only; the handle is a 256-bit
  secret only the CLI holds, and the result (the session token) is given once,
  to the first poll after it, then forgotten.
* The callback is accepted once per attempt: a second one with the same state
  (a replayed or reloaded URL) is refused, and so is a state the gateway never
  made. A device code is accepted once, and its entry is throttled per address.
* The principal comes from the store's binding of (issuer, ``sub``), never from
  the name alone (:mod:`gateway.store.sso`).
* The client secret is read from the store for each code exchange and goes
  only to the provider's token endpoint; no message, log line or answer holds
  it, or the code, the verifier or a token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

import httpx

from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.identity.oidc import (
    KeyNotFound,
    ProviderMetadata,
    SignInRefused,
    authorization_url,
    check_endpoint,
    claimed_groups,
    discovery_url,
    format_user_code,
    new_user_code,
    normalise_user_code,
    pkce_verifier,
    user_name,
    validate_id_token,
)
from gateway.identity.ports import SsoStore, StoreThread
from gateway.identity.principals import GroupMapping, SsoProvider, SsoSignIn
from gateway.identity.service import IdentityService, IssuedToken, LoginThrottle

__all__ = [
    "ATTEMPT_SECONDS",
    "CALLBACK_PATH",
    "DEVICE_PATH",
    "MAX_ATTEMPTS",
    "PollResult",
    "SsoService",
    "StartedSignIn",
]

#: How long a sign-in may take, from `pam login --sso` to the callback.
ATTEMPT_SECONDS: Final = 600.0
#: Sign-ins in progress at once (the oldest are dropped beyond this).
MAX_ATTEMPTS: Final = 1000
#: Sign-ins in progress from one address at once (so that one address cannot
#: push everyone else's out).
MAX_ATTEMPTS_PER_ADDRESS: Final = 50
#: How often the CLI is told to poll (seconds).
POLL_INTERVAL_SECONDS: Final = 1.0
#: Wrong device codes from one address before a pause (LoginThrottle's window).
MAX_WRONG_CODES_PER_ADDRESS: Final = 20
#: Discovery documents and key sets are fetched again after this long.
CACHE_SECONDS: Final = 3600.0
HTTP_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_SCOPES: Final = "openid profile email"
DEFAULT_GROUPS_CLAIM: Final = "groups"
CALLBACK_PATH: Final = "/v1/sso/callback"
DEVICE_PATH: Final = "/v1/sso/device"

_AWAITING_CODE = "awaiting_code"  # device flow: nobody has entered the code yet
_AWAITING_CALLBACK = "awaiting_callback"
_COMPLETING = "completing"
_DONE = "done"
_FAILED = "failed"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class StartedSignIn:
    """What the CLI gets from a start: the handle to poll with (shown once) and
    either the authorization URL or a user code and where to enter it."""

    handle: str = field(repr=False)
    expires_at: datetime
    interval: float
    authorization_url: str | None = None
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None


@dataclass(frozen=True)
class PollResult:
    #: ``pending``, ``done``, ``failed`` or ``expired``
    status: str
    token: IssuedToken | None = None
    message: str | None = None
    hint: str | None = None
    groups: tuple[str, ...] = ()


@dataclass(eq=False)
class _Attempt:
    handle_digest: str
    deadline: float
    expires_at: datetime
    source: str
    redirect_uri: str
    status: str
    user_code: str | None = None
    state_digest: str | None = None
    nonce: str = field(default="", repr=False)
    verifier: str = field(default="", repr=False)
    token: IssuedToken | None = field(default=None, repr=False)
    groups: tuple[str, ...] = ()
    message: str | None = None
    hint: str | None = None


class SsoService:
    def __init__(
        self,
        store: SsoStore,
        db: StoreThread,
        identity: IdentityService,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._db = db
        self._identity = identity
        self._http = http or httpx.AsyncClient(
            timeout=HTTP_TIMEOUT_SECONDS, trust_env=False, follow_redirects=False
        )
        self._clock = clock
        #: handle digest -> attempt, oldest first
        self._attempts: OrderedDict[str, _Attempt] = OrderedDict()
        self._by_state: dict[str, _Attempt] = {}
        self._by_code: dict[str, _Attempt] = {}
        self._metadata: dict[str, tuple[float, ProviderMetadata]] = {}
        self._jwks: dict[str, tuple[float, Any]] = {}
        self.code_throttle = LoginThrottle(address_limit=MAX_WRONG_CODES_PER_ADDRESS, clock=clock)

    async def close(self) -> None:
        await self._http.aclose()

    # --- configuration (admins of every project) ------------------------------------

    async def configure(
        self,
        *,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        groups_claim: str = DEFAULT_GROUPS_CLAIM,
        scopes: str = DEFAULT_SCOPES,
        redirect_base: str | None = None,
    ) -> SsoProvider:
        """Check the provider (its discovery document must name *issuer*) and keep
        the registration; *client_secret* None keeps the stored secret."""
        check_endpoint(issuer, "issuer")
        if redirect_base is not None:
            redirect_base = check_endpoint(redirect_base, "redirect base").rstrip("/")
        words = scopes.split()
        if "openid" not in words:
            words.insert(0, "openid")
        if not client_id.strip() or not groups_claim.strip():
            raise InvalidRequest("the client id and the groups claim must not be empty")
        self._metadata.clear()
        self._jwks.clear()
        await self._provider_metadata(issuer)
        provider = SsoProvider(
            issuer=issuer,
            client_id=client_id,
            groups_claim=groups_claim,
            scopes=" ".join(dict.fromkeys(words)),
            redirect_base=redirect_base,
            updated_at=datetime.now(UTC),
        )
        await self._db(self._store.set_sso_provider, provider, client_secret=client_secret)
        return await self.provider()

    async def provider(self) -> SsoProvider:
        found = await self._db(self._store.sso_provider)
        if found is None:
            raise NotFound(
                "single sign-on is not configured on this gateway",
                hint="an administrator sets it up with `pam sso configure`",
            )
        return found

    async def remove(self) -> bool:
        self._metadata.clear()
        self._jwks.clear()
        return await self._db(self._store.remove_sso_provider)

    async def mappings(self) -> list[GroupMapping]:
        return await self._db(self._store.sso_mappings)

    async def map_group(self, mapping: GroupMapping) -> GroupMapping:
        return await self._db(self._store.map_sso_group, mapping)

    async def unmap_group(self, claim_value: str) -> None:
        await self._db(self._store.unmap_sso_group, claim_value)

    # --- starting -------------------------------------------------------------------

    async def start(self, *, device: bool, base_url: str, source: str) -> StartedSignIn:
        """A new attempt; *base_url* is where the caller reached the API (the
        callback's base unless the provider's registration names one)."""
        provider = await self._configured()
        metadata = await self._provider_metadata(provider.issuer)
        base = (provider.redirect_base or base_url).rstrip("/")
        self._forget_expired()
        if sum(a.source == source for a in self._attempts.values()) >= MAX_ATTEMPTS_PER_ADDRESS:
            raise InvalidRequest(
                "too many sign-ins in progress from this address",
                hint="finish one, or wait: an unfinished sign-in lasts 10 minutes",
            )
        handle = secrets.token_urlsafe(32)
        now = self._clock()
        attempt = _Attempt(
            handle_digest=_digest(handle),
            deadline=now + ATTEMPT_SECONDS,
            expires_at=datetime.now(UTC) + timedelta(seconds=ATTEMPT_SECONDS),
            source=source,
            redirect_uri=base + CALLBACK_PATH,
            status=_AWAITING_CODE if device else _AWAITING_CALLBACK,
        )
        self._remember(attempt)
        if not device:
            url = self._authorize(attempt, provider, metadata)
            return StartedSignIn(handle, attempt.expires_at, POLL_INTERVAL_SECONDS, url)
        code = new_user_code()
        while code in self._by_code:
            code = new_user_code()
        attempt.user_code = code
        self._by_code[code] = attempt
        shown = format_user_code(code)
        verification = base + DEVICE_PATH
        return StartedSignIn(
            handle,
            attempt.expires_at,
            POLL_INTERVAL_SECONDS,
            user_code=shown,
            verification_uri=verification,
            verification_uri_complete=f"{verification}?{urlencode({'user_code': shown})}",
        )

    async def begin_device(self, user_code: str, *, source: str) -> str:
        """The authorization URL for the attempt whose code a person entered."""
        keys = (f"addr:{source}",)
        wait = self.code_throttle.retry_after(keys)
        if wait is not None:
            raise SignInRefused(
                "too many wrong codes from this address",
                hint=f"try again in {max(1, round(wait))} s",
            )
        # The provider first: the code is used up only once nothing else can fail.
        provider = await self._configured()
        metadata = await self._provider_metadata(provider.issuer)
        self._forget_expired()
        attempt = self._by_code.pop(normalise_user_code(user_code), None)
        if attempt is None or attempt.status != _AWAITING_CODE:
            self.code_throttle.failed(keys)
            raise SignInRefused(
                "that code is unknown, expired or already used",
                hint="check the code your terminal shows, or run `pam login --sso --device` again",
            )
        attempt.status = _AWAITING_CALLBACK
        return self._authorize(attempt, provider, metadata)

    def _authorize(
        self, attempt: _Attempt, provider: SsoProvider, metadata: ProviderMetadata
    ) -> str:
        state = secrets.token_urlsafe(32)
        attempt.state_digest = _digest(state)
        attempt.nonce = secrets.token_urlsafe(32)
        attempt.verifier = pkce_verifier()
        self._by_state[attempt.state_digest] = attempt
        return authorization_url(
            metadata,
            client_id=provider.client_id,
            redirect_uri=attempt.redirect_uri,
            scopes=provider.scopes,
            state=state,
            nonce=attempt.nonce,
            verifier=attempt.verifier,
        )

    # --- finishing ------------------------------------------------------------------

    async def callback(
        self,
        *,
        state: str | None,
        code: str | None,
        error: str | None = None,
        error_description: str | None = None,
    ) -> SsoSignIn:
        """The browser's return from the provider: one per attempt. Raises
        :class:`SignInRefused` saying why (the attempt then fails too)."""
        self._forget_expired()
        attempt = self._by_state.pop(_digest(state), None) if state else None
        if attempt is None or attempt.status != _AWAITING_CALLBACK:
            raise SignInRefused(
                "this sign-in is unknown, expired or already completed",
                hint="start again with `pam login --sso`",
            )
        attempt.status = _COMPLETING
        try:
            if error:
                detail = f": {_short(error_description, 200)}" if error_description else ""
                raise SignInRefused(
                    f"the identity provider refused the sign-in ({_short(error)}{detail})"
                )
            if not code:
                raise SignInRefused("the identity provider sent no authorization code")
            signed_in = await self._complete(attempt, code)
        except GatewayError as exc:
            refusal = exc if isinstance(exc, SignInRefused) else SignInRefused(exc.message)
            attempt.status = _FAILED
            attempt.message, attempt.hint = refusal.message, refusal.hint
            raise refusal from None
        return signed_in

    async def _complete(self, attempt: _Attempt, code: str) -> SsoSignIn:
        provider = await self._configured()
        metadata = await self._provider_metadata(provider.issuer)
        id_token = await self._exchange(attempt, code, provider, metadata)
        try:
            identity = validate_id_token(
                id_token,
                await self._keys(metadata),
                metadata=metadata,
                client_id=provider.client_id,
                nonce=attempt.nonce,
            )
        except KeyNotFound:
            # The provider may have rotated its keys since they were fetched.
            identity = validate_id_token(
                id_token,
                await self._keys(metadata, refresh=True),
                metadata=metadata,
                client_id=provider.client_id,
                nonce=attempt.nonce,
            )
        signed_in = await self._db(
            self._store.sso_sign_in,
            issuer=provider.issuer,
            subject=identity.subject,
            name=user_name(identity.claims),
            claim_values=claimed_groups(identity.claims, provider.groups_claim),
        )
        attempt.token = await self._identity.issue_session(signed_in.principal_id, signed_in.name)
        attempt.groups = signed_in.groups
        attempt.status = _DONE
        return signed_in

    async def _exchange(
        self, attempt: _Attempt, code: str, provider: SsoProvider, metadata: ProviderMetadata
    ) -> str:
        """The code for an ID token at the token endpoint (Core section 3.1.3)."""
        secret = await self._db(self._store.sso_client_secret)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": attempt.redirect_uri,
            "code_verifier": attempt.verifier,
        }
        extra: dict[str, Any] = {}
        if metadata.client_auth == "client_secret_post":
            form.update(client_id=provider.client_id, client_secret=secret)
        else:
            # RFC 6749, section 2.3.1: both form-encoded before Basic.
            extra["auth"] = httpx.BasicAuth(
                quote(provider.client_id, safe=""), quote(secret, safe="")
            )
        try:
            response = await self._http.post(
                metadata.token_endpoint,
                data=form,
                headers={"Accept": "application/json"},
                **extra,
            )
        except httpx.HTTPError as exc:
            raise SignInRefused(
                f"cannot reach the identity provider's token endpoint ({type(exc).__name__})"
            ) from None
        body = _json_object(response)
        if response.status_code != 200:
            error = _short(body.get("error")) or f"HTTP {response.status_code}"
            raise SignInRefused(
                f"the identity provider refused the code exchange ({error})",
                hint="check the client id and secret (`pam sso configure`)"
                if error in ("invalid_client", "unauthorized_client")
                else None,
            )
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise SignInRefused("the identity provider answered without an ID token")
        return id_token

    def poll(self, handle: str) -> PollResult:
        """Where the attempt of *handle* stands; a finished one is answered once."""
        attempt = self._attempts.get(_digest(handle))
        if attempt is None:
            raise NotFound(
                "no such sign-in: it expired, or its result was already collected",
                hint="start again with `pam login --sso`",
            )
        if attempt.status == _DONE:
            self._forget(attempt)
            return PollResult("done", token=attempt.token, groups=attempt.groups)
        if attempt.status == _FAILED:
            self._forget(attempt)
            return PollResult("failed", message=attempt.message, hint=attempt.hint)
        if self._clock() >= attempt.deadline and attempt.status != _COMPLETING:
            self._forget(attempt)
            return PollResult("expired", message="the sign-in was not completed in time")
        return PollResult("pending")

    # --- attempts -------------------------------------------------------------------

    def _remember(self, attempt: _Attempt) -> None:
        self._attempts[attempt.handle_digest] = attempt
        while len(self._attempts) > MAX_ATTEMPTS:
            self._forget(next(iter(self._attempts.values())))

    def _forget(self, attempt: _Attempt) -> None:
        self._attempts.pop(attempt.handle_digest, None)
        if attempt.state_digest is not None:
            self._by_state.pop(attempt.state_digest, None)
        if attempt.user_code is not None and self._by_code.get(attempt.user_code) is attempt:
            del self._by_code[attempt.user_code]

    def _forget_expired(self) -> None:
        """Drop attempts past their deadline that nobody collected (a finished
        one waits for its poll until then too)."""
        now = self._clock()
        for attempt in [a for a in self._attempts.values() if a.deadline <= now]:
            if attempt.status != _COMPLETING:
                self._forget(attempt)

    # --- the provider ---------------------------------------------------------------

    async def _configured(self) -> SsoProvider:
        found = await self._db(self._store.sso_provider)
        if found is None:
            raise InvalidRequest(
                "single sign-on is not configured on this gateway",
                hint="an administrator sets it up with `pam sso configure`",
            )
        return found

    async def _provider_metadata(self, issuer: str) -> ProviderMetadata:
        cached = self._metadata.get(issuer)
        if cached is not None and self._clock() - cached[0] < CACHE_SECONDS:
            return cached[1]
        document = await self._get_json(discovery_url(issuer), "discovery document")
        metadata = ProviderMetadata.parse(document, issuer=issuer)
        self._metadata[issuer] = (self._clock(), metadata)
        return metadata

    async def _keys(self, metadata: ProviderMetadata, *, refresh: bool = False) -> Any:
        cached = self._jwks.get(metadata.jwks_uri)
        if not refresh and cached is not None and self._clock() - cached[0] < CACHE_SECONDS:
            return cached[1]
        keys = await self._get_json(metadata.jwks_uri, "key set (JWKS)")
        self._jwks[metadata.jwks_uri] = (self._clock(), keys)
        return keys

    async def _get_json(self, url: str, what: str) -> Any:
        where = urlsplit(url).netloc
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise InvalidRequest(
                f"cannot fetch the identity provider's {what} from {where} ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise InvalidRequest(
                f"the identity provider's {what} at {where} answered HTTP {response.status_code}"
            )
        try:
            return response.json()
        except ValueError:
            raise InvalidRequest(f"the identity provider's {what} at {where} is not JSON") from None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _short(value: object, limit: int = 80) -> str:
    """Text a provider sent (an error code, a description), short and printable."""
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value[:limit] if c.isprintable())
