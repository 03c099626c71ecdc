"""What the rotation record holds, and the rotation in flight, as plain values.

The store writes and reads these (``gateway.store.rotations``); the rotation
service (:mod:`gateway.credentials.rotation`) makes them; the API shows them.

Invariant: nothing here can hold a password. A record says who or what started
a rotation, when, how it changed the password upstream, how it ended and why
(the upstream's error text, which names roles and never a password).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

#: ``generated``: pam made the password and set it upstream (``pam account
#: rotate --now``, ``--managed``, a scheduler); ``typed``: an admin gave a
#: password that is already the upstream's (``pam account rotate`` with a prompt)
RotationMethod = Literal["generated", "typed"]
#: who ran the ALTER ROLE: the account itself, or the resource's rotation role
RotationVia = Literal["self", "rotator"]
#: ``rotated``: the new password works upstream and is the stored one;
#: ``stored``: a typed password was stored; ``failed``: nothing changed (the
#: ALTER ROLE was refused or never sent); ``rolled_back``: the new password was
#: set but did not sign in, and the previous one was set again
RotationOutcome = Literal["rotated", "stored", "failed", "rolled_back"]
ROTATION_OUTCOMES: Final = frozenset(get_args(RotationOutcome))


@dataclass(frozen=True, slots=True)
class RotationEntry:
    """One rotation (or stored password) of the record; never the password."""

    rotation_id: str
    resource: str
    account: str
    username: str
    method: RotationMethod
    via: RotationVia | None
    started_by: str
    started_at: datetime
    ended_at: datetime
    outcome: RotationOutcome
    detail: str | None = None
    #: the gateway that started it (None in records from before revision 0015)
    gateway_id: str | None = None
    #: its place in the rotation record's chain (``pam audit verify`` names it);
    #: None until stored, and in records from before revision 0015
    seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("rotated", "stored")


@dataclass(frozen=True, slots=True)
class PendingRotation:
    """A rotation whose new password is stored but not yet promoted or dropped."""

    rotation_id: str
    resource: str
    account: str
    username: str
    via: RotationVia
    started_by: str
    started_at: datetime
    #: the gateway running it (None: started before revision 0015)
    gateway_id: str | None = None
