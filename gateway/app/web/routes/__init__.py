"""The console's page areas, one router each; :data:`ROUTERS` is what the app
serves, in order."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.app.web.routes import auth, explorer, home, terminal

ROUTERS: list[APIRouter] = [
    auth.router,
    home.router,
    terminal.router,
    explorer.router,
]
