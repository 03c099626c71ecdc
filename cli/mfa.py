"""Second-factor codes on the CLI's side: asking for one once, and the enrolment's QR code.

A call the gateway answers with the error ``code`` ``mfa_required`` is retried
once with a code (:func:`with_second_factor`): the one given (``--otp``), else
one asked for on the terminal without echo, else the next line of stdin when
stdin is not a terminal. With none of those the gateway's own refusal is the
one error line.

Invariant: a code is never echoed, printed or put in an error; the secret is
printed only by `pam mfa enroll`, the one time the user asked to see it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Final, TypeVar

import click

from cli.client import ApiError

__all__ = ["MFA_REQUIRED", "ask_code", "qr_text", "with_second_factor"]

T = TypeVar("T")

#: the error ``code`` of a call that needs a second-factor code
MFA_REQUIRED: Final = "mfa_required"
#: the prompt, where the code is asked for
PROMPT: Final = "Second-factor code"


def ask_code(prompt: str = PROMPT) -> str | None:
    """A code typed on the terminal (no echo), or stdin's next line; None if neither."""
    if sys.stdin.isatty():
        typed: str = click.prompt(prompt, hide_input=True, err=True, default="", show_default=False)
        return typed.strip() or None
    line = sys.stdin.readline()
    return line.strip() or None


def with_second_factor(call: Callable[[str | None], T], otp: str | None) -> T:
    """``call(otp)``; if the gateway asks for a code and none was given, ask
    once and call again with it."""
    try:
        return call(otp)
    except ApiError as exc:
        if exc.code != MFA_REQUIRED or otp:
            raise
        code = ask_code()
        if code is None:
            raise
        return call(code)


def qr_text(uri: str) -> str:
    """*uri* as a QR code drawn with half blocks, two modules a character."""
    import segno  # only `pam mfa enroll` draws one

    out = io.StringIO()
    segno.make(uri, micro=False).terminal(out=out, compact=True)
    return out.getvalue()
