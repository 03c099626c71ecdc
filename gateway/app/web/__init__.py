"""The web console: server-rendered pages under ``/ui/`` on the control API's
address, for reviewers, approvers and admins (docs/web.md).

Its own ASGI app (:func:`create_web_app`) mounted into the control API's, so that
its error pages, headers and cookies are its own while users, roles, projects,
MFA and single sign-on are the API's (:class:`~gateway.app.gateway.Gateway`).
Pages are Jinja2 templates (``templates/``); where a page updates itself it uses
htmx and its server-sent-events extension, shipped in ``static/vendor/`` (their
versions and digests in ``SHA256SUMS``): the console fetches nothing from
anywhere but the gateway, and runs no script of its own.

One module a page area in ``routes/``; :mod:`gateway.app.web.deps` is what they
share (the caller, CSRF, rendering) and :mod:`gateway.app.web.security` the
cookie, CSRF and header rules.
"""

from __future__ import annotations

from fastapi import FastAPI

from gateway.app.gateway import Gateway
from gateway.app.web.app import create_web_app
from gateway.app.web.deps import PREFIX

__all__ = ["PREFIX", "create_web_app", "mount"]


def mount(app: FastAPI, service: Gateway) -> None:
    """Serve the console under :data:`PREFIX` of *app*."""
    app.mount(PREFIX, create_web_app(service))
