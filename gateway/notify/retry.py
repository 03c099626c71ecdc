"""The retry schedule of a delivery: exponential backoff, a fixed number of attempts.

After the n-th failed attempt (n = 1, 2, ...) the next one is due
``first_delay * factor ** (n - 1)`` seconds later; after ``max_attempts``
failed attempts the delivery has failed for good. With the defaults
(``gateway.config.GatewaySettings``: 10 s, factor 3, 8 attempts) the last
attempt comes about three hours after the first.

Invariant: pure arithmetic; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetryPolicy"]


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
        return self.first_delay * self.factor ** max(attempts - 1, 0)

    def schedule(self) -> list[float]:
        """Every wait between attempts, in order (``max_attempts - 1`` of them)."""
        return [self.first_delay * self.factor**n for n in range(self.max_attempts - 1)]
