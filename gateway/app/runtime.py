"""What every process of the gateway runs on: its event loop and its store thread.

Kept apart from the daemon's and the gateway's modules so that a relay worker
(``gateway.app.relay_worker``) imports neither uvicorn, FastAPI nor the web
console to get them: a worker starts in about a second less, and with some
70 MB less resident, each time it is (re)started.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.errors import ConfigError

__all__ = ["StoreThread", "event_loop_factory"]

T = TypeVar("T")


class StoreThread:
    """One worker thread for every store call: the event loop never blocks on
    disk, and SQLite writes are serialised."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pam-store")

    async def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (``pip install 'pam-gateway[speed]'``), unless
    ``PAM_EVENT_LOOP=asyncio``; None means the standard asyncio loop."""
    choice = os.environ.get("PAM_EVENT_LOOP", "auto")
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"PAM_EVENT_LOOP must be auto, uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "PAM_EVENT_LOOP=uvloop but uvloop is not installed",
                hint="pip install 'pam-gateway[speed]'",
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
