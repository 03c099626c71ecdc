"""Durations as people type them: ``15m``, ``1h30m``, ``45s``.

The one formatter of the form ``--duration``, ``--max-duration`` and
``--idle-timeout`` take (the CLI parses it: ``cli.access.parse_duration``), so
that a refusal or a FATAL names a limit the way it was set.
"""

from __future__ import annotations

__all__ = ["format_duration", "in_words"]


def format_duration(seconds: float) -> str:
    """``15m``, ``1h30m``, ``45s`` (whole seconds; ``0s`` for none)."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    parts = (f"{hours}h" * bool(hours), f"{minutes}m" * bool(minutes), f"{secs}s" * bool(secs))
    return "".join(parts) or "0s"


def in_words(seconds: int) -> str:
    """``5 minutes``, ``1 minute``, ``90 seconds`` (as the expiry notices say)."""
    count, unit = (seconds // 60, "minute") if seconds % 60 == 0 else (seconds, "second")
    return f"{count} {unit}{'s' if count != 1 else ''}"
