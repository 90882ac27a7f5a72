"""When and how a failed call is tried again.

``Retry`` is an immutable policy: exponential backoff with full jitter (the
wait before retry *n* is uniform in ``[0, min(maximum, initial *
multiplier**(n-1))]``), a cap on attempts, and the codes worth retrying.
Whether a method may be retried at all is not the policy's call: only RPCs
whose contract says ``idempotent`` are (the ``(autoecoops.common.v1.method)``
option, read through ``descriptors.method_info``).

``RetryThrottle`` is gRPC's retry throttling (gRFC A6): a token bucket per
server that every attempt feeds, which stops retries while more than half of
it is drained, so a fleet of clients cannot turn an overloaded server's
errors into a retry storm.

``Attempts`` is the bookkeeping of one call's loop, shared by the sync and
async clients: one overall deadline, each attempt gets what is left of it,
and a wait that would not fit before the deadline is not started.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc

from autoecoops.kernel.mesh.backoff import exponential_delay
from autoecoops.kernel.mesh.errors import AutoEcoOpsError
from autoecoops.sdk.clock import Clock

#: Retried for idempotent methods whatever the details.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Retried for idempotent methods only when the server sent RetryInfo: without
#: it, a quota or a conflict is as likely to persist as to clear.
RETRYABLE_WITH_RETRY_INFO = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with full jitter for idempotent calls. Immutable:
    the ``with_*`` builders return changed copies."""

    #: Upper bound of the first wait; later bounds grow by ``multiplier``.
    initial: timedelta = timedelta(milliseconds=100)
    #: Growth of the bound from one retry to the next.
    multiplier: float = 2.0
    #: The largest bound, however many retries came before.
    maximum: timedelta = timedelta(seconds=5)
    #: Attempts in all, the first included; 1 never retries.
    max_attempts: int = 5
    #: Codes retried whatever the details.
    codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE)
    #: Codes retried only when the error carries RetryInfo, after its delay.
    codes_with_retry_info: frozenset[grpc.StatusCode] = field(default=RETRYABLE_WITH_RETRY_INFO)

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0):
            raise ValueError(f"Retry.initial must be positive, not {self.initial}")
        if self.maximum < self.initial:
            raise ValueError(f"Retry.maximum ({self.maximum}) is below initial ({self.initial})")
        if not self.multiplier >= 1.0:
            raise ValueError(f"Retry.multiplier must be at least 1, not {self.multiplier}")
        if not 1 <= self.max_attempts <= 100:
            raise ValueError(f"Retry.max_attempts must be in [1, 100], not {self.max_attempts}")
        # Sets given as lists or tuples still hash and compare as sets.
        object.__setattr__(self, "codes", frozenset(self.codes))
        object.__setattr__(self, "codes_with_retry_info", frozenset(self.codes_with_retry_info))

    def with_delay(
        self,
        *,
        initial: timedelta | None = None,
        multiplier: float | None = None,
        maximum: timedelta | None = None,
    ) -> Retry:
        """A copy with other backoff bounds."""
        return dataclasses.replace(
            self,
            initial=self.initial if initial is None else initial,
            multiplier=self.multiplier if multiplier is None else multiplier,
            maximum=self.maximum if maximum is None else maximum,
        )

    def with_max_attempts(self, max_attempts: int) -> Retry:
        """A copy that makes at most ``max_attempts`` attempts."""
        return dataclasses.replace(self, max_attempts=max_attempts)

    def with_codes(
        self,
        codes: Iterable[grpc.StatusCode],
        with_retry_info: Iterable[grpc.StatusCode] = RETRYABLE_WITH_RETRY_INFO,
    ) -> Retry:
        """A copy that retries other codes."""
        return dataclasses.replace(
            self, codes=frozenset(codes), codes_with_retry_info=frozenset(with_retry_info)
        )

    def bound(self, retry: int) -> float:
        """The largest wait before retry number ``retry`` (1 is the first), in seconds."""
        return exponential_delay(
            retry, self.initial.total_seconds(), self.multiplier, self.maximum.total_seconds()
        )

    def backoff(self, retry: int, random: float) -> float:
        """The wait before retry number ``retry``, for a ``random`` in [0, 1) (full jitter)."""
        return random * self.bound(retry)

    def retryable(self, error: AutoEcoOpsError) -> bool:
        """Whether ``error`` is worth another attempt of an idempotent call."""
        code = error.code
        return code in self.codes or (
            code in self.codes_with_retry_info and error.retry_delay is not None
        )

    def counts_against_throttle(self, error: AutoEcoOpsError) -> bool:
        """Whether ``error`` is an overload signal that drains the throttle's bucket."""
        return error.code in self.codes or error.code in self.codes_with_retry_info


#: The clients' default policy.
DEFAULT_RETRY = Retry()
#: A policy that never retries.
NO_RETRY = Retry(max_attempts=1)


@dataclass(frozen=True, slots=True)
class RetryThrottle:
    """gRPC's retry throttling (gRFC A6) for one client: a bucket per server."""

    #: The bucket's size; retries stop while it holds half or less. (0, 1000].
    max_tokens: float = 10.0
    #: What a success puts back into the bucket (a failure takes 1). (0, 1].
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.max_tokens <= 1000:
            raise ValueError(
                f"RetryThrottle.max_tokens must be in (0, 1000], not {self.max_tokens}"
            )
        if not 0 < self.token_ratio <= 1:
            raise ValueError(f"RetryThrottle.token_ratio must be in (0, 1], not {self.token_ratio}")

    def bucket(self) -> TokenBucket:
        """A full bucket for one server."""
        return TokenBucket(self.max_tokens, self.token_ratio)


class TokenBucket:
    """One server's throttle state; safe to share between threads.

    Counted in thousandths of a token, as gRPC does, so a long run of
    successes adds up exactly instead of drifting in floating point.
    """

    __slots__ = ("_lock", "_max", "_ratio", "_threshold", "_tokens")

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self._max = round(max_tokens * 1000)
        self._ratio = round(token_ratio * 1000)
        self._threshold = self._max // 2
        self._tokens = self._max
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """Tokens left, for tests and metrics."""
        return self._tokens / 1000

    def succeeded(self) -> None:
        """An attempt got an answer: refill by the ratio."""
        if self._tokens < self._max:
            with self._lock:
                self._tokens = min(self._max, self._tokens + self._ratio)

    def failed(self) -> None:
        """An attempt met an overloaded or unavailable server: take a token."""
        with self._lock:
            self._tokens = max(0, self._tokens - 1000)

    def allows_retry(self) -> bool:
        """Retries are allowed while more than half the bucket is left."""
        return self._tokens > self._threshold


class Attempts:
    """The loop state of one call: attempt count, deadline and the retry decision."""

    __slots__ = ("_bucket", "_clock", "_deadline", "_idempotent", "_policy", "count")

    def __init__(
        self,
        policy: Retry,
        idempotent: bool,
        deadline: float | None,
        bucket: TokenBucket | None,
        clock: Clock,
    ) -> None:
        self._policy = policy
        self._idempotent = idempotent
        self._deadline = deadline
        self._bucket = bucket
        self._clock = clock
        #: Attempts started so far.
        self.count = 0

    def start(self) -> float | None:
        """Begin an attempt; return its timeout: what is left of the deadline."""
        self.count += 1
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._clock.monotonic())

    def succeeded(self) -> None:
        """The attempt got a response."""
        if self._bucket is not None:
            self._bucket.succeeded()

    def failed(self, error: AutoEcoOpsError) -> float | None:
        """The seconds to wait before the next attempt, or None to give up
        (then ``error`` has a note saying why, when retrying was considered)."""
        policy = self._policy
        if self._bucket is not None and policy.counts_against_throttle(error):
            self._bucket.failed()
        why = self._refusal(error)
        if why is None:
            delay = (
                error.retry_delay
                if error.retry_delay is not None
                else policy.backoff(self.count, self._clock.random())
            )
            if self._deadline is None or self._clock.monotonic() + delay < self._deadline:
                return delay
            why = f"not retried after {self.count} attempt(s): waiting {delay:.3f}s would pass the deadline"
        if why:
            error.add_note(why)
        elif self.count > 1:
            error.add_note(f"failed on attempt {self.count}")
        return None

    def _refusal(self, error: AutoEcoOpsError) -> str | None:
        """Why ``error`` ends the call ('' when it is simply not retryable), or None."""
        if not self._policy.retryable(error):
            return ""
        if not self._idempotent:
            return "not retried: the method is not idempotent (its proto option)"
        if self.count >= self._policy.max_attempts:
            return f"gave up after {self.count} attempts"
        if self._bucket is not None and not self._bucket.allows_retry():
            return f"retry throttled after {self.count} attempt(s): the server keeps failing"
        return None
