"""The retry policy, the throttle and the attempt loop, with fake time and
randomness (no server, no sleeping)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import grpc
import pytest

from autoecoops.kernel.mesh.errors import (
    Aborted,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from autoecoops.sdk.clock import Clock
from autoecoops.sdk.retry import NO_RETRY, Attempts, Retry, RetryThrottle, TokenBucket


class FakeTime:
    """A monotonic clock that moves only when told, and scripted randomness."""

    def __init__(self, randoms: list[float] | None = None) -> None:
        self.now = 100.0
        self.randoms = list(randoms or [])

    def random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 0.5

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now, random=self.random)


def test_full_jitter_bounds_grow_by_the_multiplier_up_to_the_maximum() -> None:
    policy = Retry(initial=timedelta(seconds=0.1), multiplier=2.0, maximum=timedelta(seconds=1))
    assert [policy.bound(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    # Full jitter: anywhere from nothing to the bound.
    assert policy.backoff(3, 0.0) == 0.0
    assert policy.backoff(3, 0.5) == pytest.approx(0.2)
    assert policy.backoff(3, 0.999) == pytest.approx(0.3996)
    # A retry count whose growth overflows a float still has the maximum as bound.
    assert policy.bound(5000) == 1.0


def test_policies_are_immutable_and_builders_return_copies() -> None:
    base = Retry()
    faster = base.with_delay(initial=timedelta(milliseconds=10))
    fewer = base.with_max_attempts(2)
    assert base.initial == timedelta(milliseconds=100) and base.max_attempts == 5
    assert faster.initial == timedelta(milliseconds=10) and faster.maximum == base.maximum
    assert fewer.max_attempts == 2 and fewer.initial == base.initial
    assert base.with_codes([grpc.StatusCode.UNAVAILABLE]) == base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.max_attempts = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": timedelta(0)},
        {"maximum": timedelta(milliseconds=1)},
        {"multiplier": 0.5},
        {"max_attempts": 0},
    ],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="Retry"):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_unavailable_is_retried_with_backoff_until_attempts_run_out() -> None:
    fake = FakeTime(randoms=[0.5, 0.5, 0.5, 0.5])
    policy = Retry(initial=timedelta(seconds=1), multiplier=2.0, maximum=timedelta(seconds=10))
    attempts = Attempts(policy.with_max_attempts(4), True, None, None, fake.clock())
    delays = []
    for _ in range(3):
        attempts.start()
        delay = attempts.failed(Unavailable("down"))
        assert delay is not None
        delays.append(delay)
    assert delays == pytest.approx([0.5, 1.0, 2.0])
    attempts.start()
    last = Unavailable("still down")
    assert attempts.failed(last) is None
    assert last.__notes__ == ["gave up after 4 attempts"]


def test_non_idempotent_methods_and_other_codes_are_not_retried() -> None:
    fake = FakeTime()
    attempts = Attempts(Retry(), False, None, None, fake.clock())
    attempts.start()
    down = Unavailable("down")
    assert attempts.failed(down) is None
    assert "not idempotent" in down.__notes__[0]
    attempts = Attempts(Retry(), True, None, None, fake.clock())
    attempts.start()
    bad = InvalidArgument("bad")
    assert attempts.failed(bad) is None
    assert not hasattr(bad, "__notes__")


def test_retry_info_decides_for_quota_and_conflicts_and_its_delay_is_used() -> None:
    fake = FakeTime(randoms=[0.0])
    attempts = Attempts(Retry(), True, None, None, fake.clock())
    attempts.start()
    assert attempts.failed(ResourceExhausted("quota")) is None
    assert attempts.failed(Aborted("conflict")) is None
    attempts.start()
    assert attempts.failed(ResourceExhausted("quota", retry_delay=2.5)) == 2.5
    attempts.start()
    assert attempts.failed(Aborted("conflict", retry_delay=0.25)) == 0.25
    # On UNAVAILABLE too the server's delay wins over the backoff (random 0 would wait 0).
    attempts.start()
    assert attempts.failed(Unavailable("busy", retry_delay=1.5)) == 1.5


def test_each_attempt_gets_the_rest_of_one_deadline_and_no_wait_passes_it() -> None:
    fake = FakeTime(randoms=[0.9, 0.9, 0.9])
    policy = Retry(initial=timedelta(seconds=1), maximum=timedelta(seconds=8), max_attempts=10)
    attempts = Attempts(policy, True, fake.now + 5.0, None, fake.clock())
    assert attempts.start() == 5.0
    fake.now += 1.0  # the attempt took a second
    delay = attempts.failed(Unavailable("down"))
    assert delay == pytest.approx(0.9)
    fake.now += delay
    assert attempts.start() == pytest.approx(3.1)
    fake.now += 1.0
    delay = attempts.failed(Unavailable("down"))
    assert delay == pytest.approx(1.8)
    fake.now += delay
    assert attempts.start() == pytest.approx(0.3)
    fake.now += 0.2
    # 3.6 s of backoff would end past the deadline: give up now, not at the deadline.
    last = Unavailable("down")
    assert attempts.failed(last) is None
    assert "would pass the deadline" in last.__notes__[0]
    # A server's RetryInfo delay is held to the same deadline.
    attempts = Attempts(policy, True, fake.now + 1.0, None, fake.clock())
    attempts.start()
    assert attempts.failed(Unavailable("busy", retry_delay=2.0)) is None


def test_throttle_follows_grpc_token_bucket_arithmetic() -> None:
    bucket = RetryThrottle(max_tokens=10, token_ratio=0.1).bucket()
    assert bucket.allows_retry()
    for _ in range(4):
        bucket.failed()
    assert bucket.tokens == 6 and bucket.allows_retry()
    bucket.failed()
    # Exactly half left: no retries (gRFC A6: retry only while tokens > max/2).
    assert bucket.tokens == 5 and not bucket.allows_retry()
    bucket.succeeded()
    assert bucket.tokens == pytest.approx(5.1) and bucket.allows_retry()
    for _ in range(1000):
        bucket.succeeded()
    assert bucket.tokens == 10
    for _ in range(20):
        bucket.failed()
    assert bucket.tokens == 0


def test_a_drained_bucket_stops_retries_and_says_so() -> None:
    fake = FakeTime()
    bucket = TokenBucket(4, 0.5)
    errors = []
    for _ in range(3):
        attempts = Attempts(Retry(), True, None, bucket, fake.clock())
        attempts.start()
        error = Unavailable("down")
        errors.append((attempts.failed(error), error))
    # 4 -> 3 (retry allowed), 3 -> 2 (half: throttled), 2 -> 1 (throttled).
    assert errors[0][0] is not None
    assert errors[1][0] is None and "throttled" in errors[1][1].__notes__[0]
    assert errors[2][0] is None
    # Errors that say nothing about load leave the bucket alone.
    attempts = Attempts(Retry(), True, None, bucket, fake.clock())
    attempts.start()
    attempts.failed(InvalidArgument("bad"))
    assert bucket.tokens == 1


def test_no_retry_policy_makes_one_attempt() -> None:
    fake = FakeTime()
    attempts = Attempts(NO_RETRY, True, None, None, fake.clock())
    attempts.start()
    assert attempts.failed(Unavailable("down")) is None
    with pytest.raises(ValueError):
        RetryThrottle(max_tokens=0)
    with pytest.raises(ValueError):
        RetryThrottle(token_ratio=2)
