"""The webhook event catalogue, defined once, and the ``data`` of the access events.

Every event a webhook may subscribe to is a member of :class:`Event`; a webhook
subscribes to a list of them, or to ``*`` (:data:`ALL_EVENTS`: every event,
those added later included). ``docs/webhooks.md`` documents each event's
``data``; :func:`session_data` builds it for the access events, so a field is
spelled one way.

Invariants:

* A subscription list is checked against the catalogue (:func:`check_events`):
  an unknown name is refused, naming the catalogue, rather than silently never
  matching.
* ``data`` holds no secret: ids, names, times and the reasons people typed.
  Times are ISO-8601 UTC with a ``Z`` (:func:`iso_time`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from gateway.errors import InvalidRequest

__all__ = [
    "ALL_EVENTS",
    "EVENTS",
    "Event",
    "RequestFacts",
    "SessionFacts",
    "check_events",
    "is_subscribed",
    "iso_time",
    "request_data",
    "rotation_data",
    "session_data",
]


class Event(StrEnum):
    """What happened; the member's value is the event's name on the wire."""

    #: someone asked for access that needs an approval
    REQUEST_CREATED = "request.created"
    REQUEST_APPROVED = "request.approved"
    REQUEST_DENIED = "request.denied"
    #: a request nobody decided on in time
    REQUEST_EXPIRED = "request.expired"
    #: its requester withdrew it
    REQUEST_CANCELLED = "request.cancelled"
    #: a grant opened: its port (or tunnel) accepts connections
    ACCESS_OPENED = "access.opened"
    #: a grant opened without the usual approval, on the break-glass path
    ACCESS_BREAK_GLASS = "access.break_glass"
    #: a live grant's end was moved later
    ACCESS_EXTENDED = "access.extended"
    #: a live grant was ended on someone's word (``pam sessions revoke``, a user disabled)
    ACCESS_REVOKED = "access.revoked"
    #: a grant ended for any other reason (its owner let go, expiry, shutdown, error)
    ACCESS_ENDED = "access.ended"
    #: a generated password rotation ended in anything but success (failed,
    #: rolled back, or left unsettled), whoever or whatever started it
    ROTATION_FAILED = "rotation.failed"
    #: a generated password rotation worked: the new password is in use
    ROTATION_SUCCEEDED = "rotation.succeeded"
    #: ``pam webhook test``: sent to one webhook, whatever it subscribes to
    WEBHOOK_TEST = "webhook.test"


EVENTS: Final[frozenset[str]] = frozenset(Event)
#: A subscription to every event.
ALL_EVENTS: Final = "*"


def check_events(events: Iterable[str]) -> tuple[str, ...]:
    """A subscription list, checked and normalised (sorted, each name once).

    ``*`` stands alone: with it, naming events too is refused as a mistake.
    """
    chosen = set(events)
    if not chosen:
        raise InvalidRequest("a webhook needs at least one event (or * for every event)")
    unknown = sorted(chosen - EVENTS - {ALL_EVENTS})
    if unknown:
        raise InvalidRequest(
            f"unknown webhook event {unknown[0]!r}",
            hint="events: " + ", ".join(e.value for e in Event) + ", or * for every event",
        )
    if ALL_EVENTS in chosen and len(chosen) > 1:
        raise InvalidRequest("event * already means every event; give it alone")
    return tuple(sorted(chosen))


def is_subscribed(events: Iterable[str], event: str) -> bool:
    """Whether a webhook subscribed to *events* gets *event* (never ``webhook.test``,
    which goes to the webhook it was asked for, whatever it subscribes to)."""
    if event == Event.WEBHOOK_TEST:
        return False
    subscribed = set(events)
    return ALL_EVENTS in subscribed or event in subscribed


def iso_time(moment: datetime) -> str:
    """``2026-12-07T10:15:00.123456Z``: UTC, microseconds, ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class SessionFacts(Protocol):
    """What the access events tell of a session (the store's record has these)."""

    @property
    def id(self) -> str: ...
    @property
    def requester(self) -> str: ...
    @property
    def resource_name(self) -> str: ...
    @property
    def account_name(self) -> str: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def end_reason(self) -> str | None: ...
    @property
    def end_detail(self) -> str | None: ...


def session_data(session: SessionFacts) -> dict[str, Any]:
    """The ``data`` of an ``access.*`` event; an ended session's also says how it ended."""
    data: dict[str, Any] = {
        "session_id": session.id,
        "requester": session.requester,
        "resource": session.resource_name,
        "account": session.account_name,
        "reason": session.reason,
        "started_at": iso_time(session.started_at),
        "expires_at": iso_time(session.expires_at),
    }
    if session.ended_at is not None:
        data |= {
            "ended_at": iso_time(session.ended_at),
            "end_reason": None if session.end_reason is None else str(session.end_reason),
            "end_detail": session.end_detail,
        }
    return data


class ApprovalFacts(Protocol):
    @property
    def by(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def comment(self) -> str | None: ...


class RequestFacts(Protocol):
    """What the ``request.*`` events tell of an access request."""

    @property
    def id(self) -> str: ...
    @property
    def project(self) -> str: ...
    @property
    def requester(self) -> str: ...
    @property
    def resource(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def duration_seconds(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def policy_name(self) -> str: ...
    @property
    def approvals_required(self) -> int: ...
    @property
    def approvers(self) -> tuple[str, ...]: ...
    @property
    def approvals(self) -> tuple[ApprovalFacts, ...]: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def use_by(self) -> datetime | None: ...
    @property
    def decided_by(self) -> str | None: ...
    @property
    def decision_note(self) -> str | None: ...
    @property
    def session_id(self) -> str | None: ...
    @property
    def break_glass(self) -> bool: ...
    @property
    def extends(self) -> bool: ...


def request_data(request: RequestFacts, *, state: str, actor: str) -> dict[str, Any]:
    """The ``data`` of a ``request.*`` event (and of ``access.break_glass``)."""
    return {
        "request_id": request.id,
        "state": state,
        "actor": actor,
        "requester": request.requester,
        "resource": request.resource,
        "account": request.account,
        "duration_seconds": request.duration_seconds,
        "reason": request.reason,
        "policy": request.policy_name,
        "approvals_required": request.approvals_required,
        "approvers": list(request.approvers),
        "approvals": [
            {"by": a.by, "at": iso_time(a.at), "comment": a.comment} for a in request.approvals
        ],
        "created_at": iso_time(request.created_at),
        "expires_at": iso_time(request.expires_at),
        "use_by": None if request.use_by is None else iso_time(request.use_by),
        "decided_by": request.decided_by,
        "decision_note": request.decision_note,
        "session_id": request.session_id,
        "break_glass": request.break_glass,
        "extends_session": request.extends,
    }


class RotationFacts(Protocol):
    """What the ``rotation.*`` events tell of a rotation (never its password)."""

    @property
    def resource(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def rotation_id(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def via(self) -> str | None: ...
    @property
    def started_by(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def ended_at(self) -> datetime: ...
    @property
    def detail(self) -> str | None: ...
    @property
    def hint(self) -> str | None: ...


def rotation_data(rotation: RotationFacts) -> dict[str, Any]:
    """The ``data`` of a ``rotation.*`` event."""
    return {
        "resource": rotation.resource,
        "account": rotation.account,
        "rotation_id": rotation.rotation_id,
        "outcome": rotation.outcome,
        "via": rotation.via,
        "started_by": rotation.started_by,
        "started_at": iso_time(rotation.started_at),
        "ended_at": iso_time(rotation.ended_at),
        "detail": rotation.detail,
        "hint": rotation.hint,
    }
