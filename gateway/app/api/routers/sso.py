"""Single sign-on: ``/v1/sso``.

Open routes (no token; how a caller gets one, as ``POST /v1/login``):

* ``POST /v1/sso/start``: a new sign-in; the authorization URL (browser) or a
  user code and the verification page (``{"device": true}``), and the poll
  handle;
* ``POST /v1/sso/poll``: where a sign-in stands; the session token once done;
* ``GET /v1/sso/callback``: the browser's return from the identity provider,
  answered with a small page;
* ``GET /v1/sso/device`` and ``POST /v1/sso/device``: the page where a person
  enters a device code, then is sent on to the provider.

Admin routes (admins of every project): ``GET/PUT/DELETE /v1/sso/config`` and
``GET/POST/DELETE /v1/sso/groups``.

Invariants: every refused sign-in is on record (reason ``sso_refused``); the
pages escape everything that came from outside (the provider's error text,
names) and are not framed, cached or referred from; the client secret is only
ever received.
"""

from __future__ import annotations

import html
from typing import Final
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway.app.api.deps import GlobalAdmin, Service, client_addr
from gateway.app.api.models import (
    SsoConfigIn,
    SsoConfigOut,
    SsoGroupIn,
    SsoGroupOut,
    SsoPollIn,
    SsoPollOut,
    SsoStartIn,
    SsoStartOut,
)
from gateway.app.gateway import Gateway
from gateway.errors import GatewayError, InvalidRequest
from gateway.identity.oidc import SignInRefused
from gateway.identity.principals import GroupMapping, SsoProvider
from gateway.identity.sso import CALLBACK_PATH
from gateway.refusal import Refusal, RefusalPlace, RefusalReason

public_router = APIRouter(prefix="/v1/sso")
router = APIRouter(prefix="/v1/sso")
_log = structlog.get_logger("gateway.sso")

#: The web console's cookie holding a browser sign-in's poll handle
#: (gateway.app.web.security.SSO_COOKIE).
_WEB_SSO_COOKIE: Final = "__Host-pam_sso"
#: The device page's form is a few bytes; anything larger is not it.
_MAX_FORM_BYTES: Final = 2048
_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
    " frame-ancestors 'none'",
}
_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}"
    "input{font-size:1.4rem;letter-spacing:.2rem;width:12rem}"
)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    document = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


def _refused_page(refusal: GatewayError) -> HTMLResponse:
    hint = f"<p>{html.escape(refusal.hint)}</p>" if refusal.hint else ""
    return _page("Sign-in refused", f"<p>{html.escape(refusal.message)}</p>{hint}", 400)


def _record(request: Request, service: Gateway, refusal: SignInRefused) -> None:
    service.refusals.refused(
        Refusal(
            RefusalPlace.API,
            RefusalReason.SSO_REFUSED,
            f"{request.method} {request.url.path}: {refusal.message}",
            client_addr(request) or "unknown",
            who=refusal.who,
            event="sso_refused",
        )
    )


def _config_out(provider: SsoProvider) -> SsoConfigOut:
    return SsoConfigOut(
        issuer=provider.issuer,
        client_id=provider.client_id,
        groups_claim=provider.groups_claim,
        scopes=provider.scopes,
        redirect_base=provider.redirect_base,
        redirect_uri=provider.redirect_base + CALLBACK_PATH if provider.redirect_base else None,
        updated_at=provider.updated_at,
    )


# --- open: signing in ---------------------------------------------------------------


@public_router.post("/start", status_code=201)
async def start(body: SsoStartIn, service: Service, request: Request) -> SsoStartOut:
    started = await service.sso.start(
        device=body.device,
        base_url=str(request.base_url),
        source=client_addr(request),
    )
    return SsoStartOut(
        handle=started.handle,
        expires_at=started.expires_at,
        interval=started.interval,
        authorization_url=started.authorization_url,
        user_code=started.user_code,
        verification_uri=started.verification_uri,
        verification_uri_complete=started.verification_uri_complete,
    )


@public_router.post("/poll")
async def poll(body: SsoPollIn, service: Service) -> SsoPollOut:
    result = service.sso.poll(body.handle.get_secret_value())
    token = result.token
    return SsoPollOut(
        status=result.status,
        token=token.token if token else None,
        token_id=token.token_id if token else None,
        user=token.principal if token else None,
        expires_at=token.expires_at if token else None,
        groups=list(result.groups),
        message=result.message,
        hint=result.hint,
    )


@public_router.get("/callback", response_class=HTMLResponse)
async def callback(
    service: Service,
    request: Request,
    state: str | None = None,
    code: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    try:
        signed_in = await service.sso.callback(
            state=state, code=code, error=error, error_description=error_description
        )
    except SignInRefused as refusal:
        _record(request, service, refusal)
        if request.cookies.get(_WEB_SSO_COOKIE):
            # The console's login form says why (the attempt's poll holds it).
            return RedirectResponse("/ui/sso/finish", status_code=303)
        return _refused_page(refusal)
    _log.info(
        "sso_signed_in",
        user=signed_in.name,
        created=signed_in.created,
        groups=list(signed_in.groups),
        member_of=list(signed_in.member_of),
        client_addr=client_addr(request),
    )
    if request.cookies.get(_WEB_SSO_COOKIE):
        # Started from the web console's login page: it finishes the sign-in
        # with the poll handle that cookie holds.
        return RedirectResponse("/ui/sso/finish", status_code=303)
    groups = ", ".join(signed_in.groups) or "none"
    return _page(
        "Signed in to pam",
        f"<p>You are signed in as <b>{html.escape(signed_in.name)}</b>"
        f" (groups: {html.escape(groups)}).</p>"
        "<p>You can close this window and return to your terminal.</p>",
    )


def _device_form(user_code: str = "", message: str = "", status: int = 200) -> HTMLResponse:
    problem = f"<p><b>{html.escape(message)}</b></p>" if message else ""
    return _page(
        "Sign in to pam",
        f"{problem}<p>Enter the code your terminal shows. Only enter a code from your"
        " own terminal: whoever started this sign-in gets the session.</p>"
        "<form method='post'><input name='user_code' autocomplete='off' autofocus"
        f" required value='{html.escape(user_code, quote=True)}'>"
        " <button type='submit'>Continue</button></form>",
        status,
    )


@public_router.get("/device", response_class=HTMLResponse)
async def device_page(user_code: str = "") -> HTMLResponse:
    return _device_form(user_code[:32])


def _same_origin(request: Request) -> bool:
    """A form post from this page: a browser names the page's origin; a post
    from another site's page (cross-site request forgery) names that site."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    own = urlsplit(str(request.base_url))
    theirs = urlsplit(origin)
    return (theirs.scheme, theirs.netloc) == (own.scheme, own.netloc)


@public_router.post("/device", response_class=HTMLResponse)
async def device_submit(service: Service, request: Request) -> Response:
    if not _same_origin(request):
        refusal = SignInRefused("a device code may only be entered on the gateway's own page")
        _record(request, service, refusal)
        return _device_form(message=refusal.message, status=403)
    raw = await request.body()
    if len(raw) > _MAX_FORM_BYTES:
        return _device_form(message="the form is too large", status=400)
    entered = parse_qs(raw.decode("utf-8", "replace")).get("user_code", [""])[0]
    try:
        url = await service.sso.begin_device(entered, source=client_addr(request))
    except SignInRefused as refusal:
        _record(request, service, refusal)
        hint = f" ({refusal.hint})" if refusal.hint else ""
        return _device_form(message=refusal.message + hint, status=400)
    except InvalidRequest as exc:
        return _refused_page(exc)
    return RedirectResponse(url, status_code=303, headers=_PAGE_HEADERS)


# --- admins: the provider and the group mapping -------------------------------------


@router.get("/config")
async def get_config(_admin: GlobalAdmin, service: Service) -> SsoConfigOut:
    return _config_out(await service.sso.provider())


@router.put("/config")
async def put_config(body: SsoConfigIn, _admin: GlobalAdmin, service: Service) -> SsoConfigOut:
    provider = await service.sso.configure(
        issuer=body.issuer,
        client_id=body.client_id,
        client_secret=body.client_secret.get_secret_value() if body.client_secret else None,
        groups_claim=body.groups_claim,
        scopes=body.scopes,
        redirect_base=body.redirect_base,
    )
    return _config_out(provider)


@router.delete("/config", status_code=204)
async def delete_config(_admin: GlobalAdmin, service: Service) -> None:
    await service.sso.remove()


@router.get("/groups")
async def list_groups(_admin: GlobalAdmin, service: Service) -> list[SsoGroupOut]:
    return [
        SsoGroupOut(claim_value=m.claim_value, group=m.group, project=m.project)
        for m in await service.sso.mappings()
    ]


@router.post("/groups", status_code=201)
async def map_group(body: SsoGroupIn, _admin: GlobalAdmin, service: Service) -> SsoGroupOut:
    mapping = await service.sso.map_group(
        GroupMapping(body.claim_value, body.group.removeprefix("@"), body.project)
    )
    return SsoGroupOut(
        claim_value=mapping.claim_value, group=mapping.group, project=mapping.project
    )


@router.delete("/groups", status_code=204)
async def unmap_group(claim_value: str, _admin: GlobalAdmin, service: Service) -> None:
    await service.sso.unmap_group(claim_value)
