"""Signing in and out of the console: the login form (password, and the
one-time code of a user who enrolled one) and single sign-on when the gateway
has a provider configured.

Invariants: a failed sign-in is answered with the form again and one line
saying why, never with what was typed into the password field; every refused
sign-in is on record as the API's are (``bad_password``, ``mfa_required``); the
``next`` page a sign-in returns to is only ever a path of this console (no open
redirect); the session cookie is set only by a sign-in that the identity
service accepted.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Form, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.app.api.refusals import record_api_refusal
from gateway.app.web.deps import (
    CsrfRefused,
    Service,
    WebCaller,
    client_addr,
    render,
    ui,
)
from gateway.app.web.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SSO_COOKIE,
    clear_cookie,
    new_login_nonce,
    same_origin,
    set_cookie,
)
from gateway.errors import GatewayError, NotFound
from gateway.identity.mfa import SecondFactorError
from gateway.identity.service import IssuedToken

router = APIRouter()
_log = structlog.get_logger("gateway.web")

#: How long the login form's double-submit nonce (and an SSO attempt) lives.
_LOGIN_FORM_SECONDS = 600


def _safe_next(target: str | None) -> str:
    """*target* when it is a page of this console, else the front page."""
    if target and target.startswith(ui("/")) and not any(c in target for c in ("\\", "://")):
        return target
    return ui("/")


async def _sso_enabled(service: Service) -> bool:
    try:
        await service.sso.provider()
    except NotFound:
        return False
    return True


async def _login_form(
    request: Request,
    service: Service,
    *,
    next_page: str,
    user: str = "",
    problem: str | None = None,
    hint: str | None = None,
    ask_code: bool = False,
    status_code: int = 200,
) -> HTMLResponse:
    nonce = new_login_nonce()
    response = render(
        request,
        "login.html",
        status_code=status_code,
        login_nonce=nonce,
        next_page=_safe_next(next_page),
        user=user,
        problem=problem,
        hint=hint,
        ask_code=ask_code,
        sso=await _sso_enabled(service),
    )
    set_cookie(response, LOGIN_COOKIE, nonce, max_age=_LOGIN_FORM_SECONDS)
    return response


def _signed_in(response: Response, issued: IssuedToken) -> Response:
    lifetime = (
        int((issued.expires_at - datetime.now(UTC)).total_seconds())
        if issued.expires_at is not None
        else None  # a token that does not expire: the cookie lasts as the browser does
    )
    set_cookie(response, SESSION_COOKIE, issued.token, max_age=lifetime)
    clear_cookie(response, LOGIN_COOKIE)
    return response


def _check_login_nonce(request: Request, submitted: str) -> None:
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if (
        not nonce
        or not submitted
        or not hmac.compare_digest(nonce.encode(), submitted.encode())
        or not same_origin(request)
    ):
        raise CsrfRefused


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, service: Service, next: str = "") -> HTMLResponse:
    return await _login_form(request, service, next_page=next)


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    service: Service,
    user: Annotated[str, Form(max_length=200)],
    password: Annotated[str, Form(max_length=1000)],
    login_nonce: Annotated[str, Form(max_length=100)],
    code: Annotated[str, Form(max_length=20)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    _check_login_nonce(request, login_nonce)
    request.state.login_name = user  # who tried, for the refusal record
    try:
        issued = await service.identity.login(
            user, password, source=client_addr(request), otp=code.strip() or None
        )
    except GatewayError as exc:
        await record_api_refusal(request, exc)
        asks_code = isinstance(exc, SecondFactorError)
        return await _login_form(
            request,
            service,
            next_page=next,
            user=user,
            problem=exc.message,
            hint="enter the code your authenticator app shows for pam" if asks_code else exc.hint,
            ask_code=asks_code,
            status_code=401,
        )
    _log.info("web_signed_in", user=issued.principal, client_addr=client_addr(request))
    return _signed_in(RedirectResponse(_safe_next(next), status_code=303), issued)


@router.post("/logout")
async def logout(request: Request, caller: WebCaller, service: Service) -> Response:
    token = request.cookies.get(SESSION_COOKIE, "")
    await service.identity.logout(token)
    _log.info("web_signed_out", user=caller.name, client_addr=client_addr(request))
    response = RedirectResponse(ui("/login"), status_code=303)
    clear_cookie(response, SESSION_COOKIE)
    return response


# --- single sign-on -------------------------------------------------------------------


@router.post("/sso")
async def sso_start(
    request: Request,
    service: Service,
    login_nonce: Annotated[str, Form(max_length=100)],
) -> Response:
    """Send the browser to the identity provider; its return
    (``/v1/sso/callback``) sends it on to :func:`sso_finish`."""
    _check_login_nonce(request, login_nonce)
    started = await service.sso.start(
        device=False,
        base_url=f"{request.url.scheme}://{request.url.netloc}/",
        source=client_addr(request),
    )
    assert started.authorization_url is not None  # a browser sign-in, not a device one
    # A page that moves on, not a redirect: the CSP's ``form-action 'self'``
    # also covers where a form's redirect leads, and the provider is elsewhere.
    response = render(request, "sso_go.html", provider_url=started.authorization_url)
    # Lax, not Strict: it must come back with the provider's (cross-site) redirect.
    set_cookie(response, SSO_COOKIE, started.handle, max_age=_LOGIN_FORM_SECONDS, same_site="lax")
    return response


@router.get("/sso/finish", response_class=HTMLResponse)
async def sso_finish(request: Request, service: Service) -> Response:
    handle = request.cookies.get(SSO_COOKIE, "")
    result = service.sso.poll(handle) if handle else None
    if result is None or result.token is None:
        response = await _login_form(
            request,
            service,
            next_page="",
            problem=(
                result.message if result and result.message else "single sign-on did not finish"
            ),
            hint=(
                result.hint
                if result and result.message
                else "start again with the single sign-on button"
            ),
            status_code=401,
        )
        clear_cookie(response, SSO_COOKIE, same_site="lax")
        return response
    _log.info("web_signed_in", user=result.token.principal, sso=True)
    # A page, not a redirect: the browser came here from the provider, and a
    # SameSite=Strict cookie is not sent on that navigation's redirects; this
    # page's own navigation is same-site.
    response = render(request, "sso_done.html", user=result.token.principal)
    clear_cookie(response, SSO_COOKIE, same_site="lax")
    return _signed_in(response, result.token)
