"""The retry schedule of a delivery: exponential backoff, a fixed number of attempts.

After the n-th failed attempt (n = 1, 2, ...) the next one is due
``first_delay * factor ** (n - 1)`` seconds later, but never more than
:data:`MAX_DELAY_SECONDS` (a day); after ``max_attempts`` failed attempts the
delivery has failed for good. With the defaults
(``gateway.config.GatewaySettings``: 10 s, factor 3, 8 attempts) the last
attempt comes about three hours after the first.

Invariant: pure arithmetic; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_DELAY_SECONDS", "RetryPolicy"]

#: the longest wait between two attempts, whatever the factor
MAX_DELAY_SECONDS: Final = 86_400.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: seconds between the first attempt and the second
    first_delay: float
    #: each further wait is this many times the one before
    factor: float
    #: attempts in all, the first included
    max_attempts: int
    #: the longest one attempt may take, connecting included (seconds)
    timeout: float

    def __post_init__(self) -> None:
        if self.first_delay <= 0 or self.factor < 1 or self.max_attempts < 1 or self.timeout <= 0:
            raise ValueError(f"not a usable retry policy: {self}")

    def delay_after(self, attempts: int) -> float | None:
        """Seconds to wait after *attempts* failed attempts; None: give up."""
        if attempts >= self.max_attempts:
            return None
        return self._wait(max(attempts - 1, 0))

    def schedule(self) -> list[float]:
        """Every wait between attempts, in order (``max_attempts - 1`` of them)."""
        return [self._wait(n) for n in range(self.max_attempts - 1)]

    def _wait(self, n: int) -> float:
        try:
            return min(self.first_delay * float(self.factor) ** n, MAX_DELAY_SECONDS)
        except OverflowError:  # a large factor to a large power: past any cap
            return MAX_DELAY_SECONDS
