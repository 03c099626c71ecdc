"""Masking secrets inside SQL before anything is stored.

Applied to every SQL text and parameter value the audit keeps:

* string literals after ``PASSWORD`` (``CREATE/ALTER ROLE ... PASSWORD '...'``,
  including ``E'...'`` and dollar quoting) become ``'***'``;
* a statement that mentions ``PASSWORD`` has its parameter values masked, since
  ``ALTER ROLE x PASSWORD $1`` carries the secret as a parameter;
* operator-configured regular expressions (their whole match, or their first
  group when they have one, is masked);
* the stored credentials of the connection's own account, wherever they appear
  (a binary parameter that contains one is masked whole rather than shown as
  base64, which would only encode the secret, not hide it).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

MASK = "***"

_LITERAL = r"(?:[eE]?'(?:[^'\\]|\\.|'')*'|\$(?P<tag>[A-Za-z_0-9]*)\$.*?\$(?P=tag)\$)"
_PASSWORD_LITERAL = re.compile(r"(?is)(\bPASSWORD\s+)" + _LITERAL)
_MENTIONS_PASSWORD = re.compile(r"(?i)\bPASSWORD\b")


@dataclass(frozen=True)
class Redactor:
    patterns: tuple[re.Pattern[str], ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def build(cls, patterns: Iterable[str] = (), secrets: Iterable[str] = ()) -> Redactor:
        return cls(
            tuple(re.compile(p) for p in patterns),
            tuple(s for s in secrets if s),
        )

    def sql(self, text: str) -> str:
        if _may_mention_password(text):
            text = _PASSWORD_LITERAL.sub(lambda m: m.group(1) + "'" + MASK + "'", text)
        for pattern in self.patterns:
            text = pattern.sub(_mask_match, text)
        return self.value(text)

    def value(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def binary(self, raw: bytes) -> str:
        """A binary value as base64, or the mask when it contains a secret."""
        for secret in self.secrets:
            if secret.encode() in raw:
                return MASK
        return base64.b64encode(raw).decode()

    @staticmethod
    def hides_parameters(sql: str) -> bool:
        """Whether the parameters of this statement may carry a secret."""
        return _may_mention_password(sql) and _MENTIONS_PASSWORD.search(sql) is not None


def _may_mention_password(text: str) -> bool:
    """A cheap necessary condition for the PASSWORD patterns to match. Those are
    case-insensitive regular expressions, which scan every position of a text;
    ASCII text (nearly all SQL) can be ruled out with one lowercase copy. Other
    text always goes to the expressions (Unicode case-insensitive matching has
    look-alikes such as U+017F, which matches ``s``)."""
    return not text.isascii() or "password" in text.lower()


def _mask_match(match: re.Match[str]) -> str:
    if match.re.groups:
        whole = match.group(0)
        start, end = match.span(1)
        offset = match.start(0)
        return whole[: start - offset] + MASK + whole[end - offset :]
    return MASK
