"""The console's page areas, one router each; :data:`ROUTERS` is what the app
serves, in order."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.web.routes import admin, auth, explorer, home, requests, sessions, terminal

ROUTERS: list[APIRouter] = [
    auth.router,
    home.router,
    requests.router,
    admin.router,
    sessions.router,
    terminal.router,
    explorer.router,
]
