"""An access grant and its states.

Today a grant is created active (its session row and listener exist) and ends
once (owner, expiry, watchdog, shutdown, a failed listen); while active, its
expiry may move later (an extension). After an end by
expiry its listener may stay up, answering every new connection with the end's
reason, until the CLI lets go. Next a grant will be requested and approved
before it is active: those states land in :class:`GrantState`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from gateway.access.ports import SessionRecord
from gateway.net.listener import AccessListener
from gateway.net.relay import Termination


class GrantState(StrEnum):
    #: its session is open and its listener relays connections
    ACTIVE = "active"
    #: its session has ended; a listener still up refuses with the end's reason
    ENDED = "ended"


@dataclass(eq=False)
class Grant:
    session: SessionRecord
    listener: AccessListener
    #: when its CLI last called in (monotonic clock)
    last_heartbeat: float
    state: GrantState = GrantState.ACTIVE
    expiry_task: asyncio.Task[None] | None = None
    #: for a grant opened from another host: its client certificate (PEM) and
    #: that certificate's public key (DER), the only key the tunnel admits for it
    certificate: bytes | None = None
    public_key: bytes | None = None
    #: held while an extension moves the expiry (one at a time)
    extending: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def is_ended(self) -> bool:
        return self.state is GrantState.ENDED


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def is_live(grant: Grant) -> bool:
    """Not ended, and not ending: an end sets the listener's refusal first."""
    return not grant.is_ended and grant.listener.refusal is None


def release(grant: Grant, termination: Termination) -> None:
    """Stop serving *grant* here without writing its session (the store says
    what became of it: ended, or held by another gateway): its live connections
    are cut with *termination* and its timer stopped."""
    grant.listener.end(termination)
    if grant.expiry_task is not None:
        grant.expiry_task.cancel()
    grant.state = GrantState.ENDED
