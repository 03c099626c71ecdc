"""`pam login --sso`: sign in through the gateway's identity provider.

The CLI never talks to the identity provider. It asks the gateway to start a
sign-in (``POST /v1/sso/start``), shows the person where to go, and polls
(``POST /v1/sso/poll``) until the gateway, which handles the browser's return,
has a session token for it. So the browser may be on another machine than the
terminal (over SSH), and with ``--device`` there need be no browser here at all.

Invariants: the poll handle stays in this process; the URL is always printed
(on stderr), and a browser is opened only where one can show: never with
``PAM_NO_BROWSER`` set, nor on a Unix without ``DISPLAY`` or ``WAYLAND_DISPLAY``;
every failure is an :class:`~cli.client.ApiError` with the gateway's reason.
"""

from __future__ import annotations

import os
import sys
import time
import webbrowser
from collections.abc import Callable
from datetime import datetime
from typing import Final

import click

from cli.client import ApiClient, ApiError, SsoPollJson
from cli.render import printable

__all__ = ["may_open_browser", "sso_sign_in"]

#: Polls at most this often, whatever the gateway says.
_MIN_INTERVAL: Final = 0.5


def may_open_browser(env: dict[str, str] | None = None, platform: str | None = None) -> bool:
    """Whether to try a browser: not when asked not to, nor on a headless Unix."""
    env = dict(os.environ) if env is None else env
    platform = platform or sys.platform
    if env.get("PAM_NO_BROWSER", "") not in ("", "0"):
        return False
    if platform in ("darwin", "win32", "cygwin"):
        return True
    return bool(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"))


def _say(text: str) -> None:
    click.echo(text, err=True)


def sso_sign_in(
    client: ApiClient,
    *,
    device: bool,
    open_browser: Callable[[str], bool] = webbrowser.open,
    sleep: Callable[[float], None] = time.sleep,
) -> SsoPollJson:
    """Start a sign-in, show where to complete it, and poll until it is done."""
    started = client.sso_start(device=device)
    if device:
        code = printable(started["user_code"] or "")
        _say(f"To sign in, open {printable(started['verification_uri'] or '')}")
        _say(f"on any device and enter the code {code}")
        if started["verification_uri_complete"]:
            _say(f"(or open {printable(started['verification_uri_complete'])})")
    else:
        url = started["authorization_url"] or ""
        _say("Sign in with your identity provider at this URL:")
        _say(f"  {printable(url)}")
        if may_open_browser():
            try:
                opened = open_browser(url)
            except Exception:  # a broken browser set-up is no reason to fail
                opened = False
            if opened:
                _say("(opened in your browser)")
    _say("Waiting for the sign-in to complete (Ctrl+C to give up)...")
    interval = max(_MIN_INTERVAL, float(started["interval"]))
    deadline = datetime.fromisoformat(started["expires_at"]).timestamp()
    while True:
        sleep(interval)
        answer = client.sso_poll(started["handle"])
        if answer["status"] == "done":
            return answer
        if answer["status"] in ("failed", "expired"):
            raise ApiError(
                answer["message"] or f"the sign-in {answer['status']}", hint=answer["hint"]
            )
        if time.time() > deadline + 30:
            raise ApiError("the sign-in was not completed in time", hint="run pam login again")
