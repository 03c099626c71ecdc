"""The backoff schedule of webhook deliveries."""

from __future__ import annotations

import pytest

from gateway.notify.retry import MAX_DELAY_SECONDS, RetryPolicy


def test_each_wait_is_the_factor_times_the_one_before_until_the_attempts_run_out() -> None:
    policy = RetryPolicy(first_delay=10, factor=3, max_attempts=5, timeout=10)
    assert [policy.delay_after(n) for n in range(1, 6)] == [10, 30, 90, 270, None]
    assert policy.schedule() == [10, 30, 90, 270]


def test_the_defaults_end_about_three_hours_after_the_first_attempt() -> None:
    policy = RetryPolicy(first_delay=10, factor=3, max_attempts=8, timeout=10)
    assert policy.schedule() == [10, 30, 90, 270, 810, 2430, 7290]
    assert sum(policy.schedule()) == 10930


def test_factor_one_is_a_constant_wait_and_one_attempt_never_retries() -> None:
    assert RetryPolicy(first_delay=0.5, factor=1, max_attempts=4, timeout=1).schedule() == [
        0.5,
        0.5,
        0.5,
    ]
    once = RetryPolicy(first_delay=1, factor=2, max_attempts=1, timeout=1)
    assert once.delay_after(1) is None
    assert once.schedule() == []


@pytest.mark.parametrize(
    "fields",
    [
        {"first_delay": 0, "factor": 2, "max_attempts": 3, "timeout": 1},
        {"first_delay": 1, "factor": 0.5, "max_attempts": 3, "timeout": 1},
        {"first_delay": 1, "factor": 2, "max_attempts": 0, "timeout": 1},
        {"first_delay": 1, "factor": 2, "max_attempts": 3, "timeout": 0},
    ],
)
def test_a_policy_that_cannot_work_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="not a usable retry policy"):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_no_wait_is_longer_than_a_day_however_large_the_factor() -> None:
    policy = RetryPolicy(first_delay=10, factor=1e6, max_attempts=100, timeout=1)
    assert policy.delay_after(1) == 10
    assert policy.delay_after(2) == MAX_DELAY_SECONDS
    assert policy.delay_after(99) == MAX_DELAY_SECONDS
    assert max(policy.schedule()) == MAX_DELAY_SECONDS
