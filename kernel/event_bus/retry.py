"""A consumer group's retry policy: exponential backoff with jitter, then the DLQ.

The n-th retry waits ``min(initial * multiplier^(n-1), max)``, spread by
+-20% jitter (as gRPC's connection backoff does) so that events that failed
together are not retried together, and never more than ``max``. A delivery
whose attempt number reaches ``max_attempts`` is dead-lettered instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf import duration

from autoecoops.events.v1 import events_pb2
from autoecoops.kernel.mesh.backoff import exponential_delay
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

#: How far a backoff is spread either way.
JITTER = 0.2
#: The longest backoff a policy may ask for.
MAX_BACKOFF_LIMIT = 86400.0
MAX_ATTEMPTS_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed delivery is tried again, and when it is dead-lettered."""

    #: Seconds before the first retry.
    initial_backoff: float = 1.0
    #: Factor each further wait grows by (>= 1).
    multiplier: float = 2.0
    #: The longest wait, in seconds.
    max_backoff: float = 300.0
    #: Deliveries in all, the first included, before the event is dead-lettered.
    max_attempts: int = 5

    def base_delay(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (1 = the first retry)."""
        return exponential_delay(retry, self.initial_backoff, self.multiplier, self.max_backoff)

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The jittered wait before retry number ``retry``; ``rand`` returns [0, 1)."""
        spread = 1.0 + JITTER * (2.0 * rand() - 1.0)
        return min(self.base_delay(retry) * spread, self.max_backoff)

    def exhausted(self, attempt: int) -> bool:
        """True when delivery number ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts

    def to_fields(self) -> dict[str, str]:
        """The policy as the group's meta hash fields."""
        return {
            "initial_ms": str(round(self.initial_backoff * 1000)),
            "multiplier": repr(self.multiplier),
            "max_ms": str(round(self.max_backoff * 1000)),
            "max_attempts": str(self.max_attempts),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> RetryPolicy:
        """The policy stored in a group's meta hash (defaults where absent)."""
        d = cls()
        return cls(
            initial_backoff=int(fields.get("initial_ms", d.initial_backoff * 1000)) / 1000,
            multiplier=float(fields.get("multiplier", d.multiplier)),
            max_backoff=int(fields.get("max_ms", d.max_backoff * 1000)) / 1000,
            max_attempts=int(fields.get("max_attempts", d.max_attempts)),
        )

    def to_proto(self) -> events_pb2.RetryPolicy:
        """The policy as its contract message."""
        return events_pb2.RetryPolicy(
            initial_backoff=duration.from_nanoseconds(round(self.initial_backoff * 1e9)),
            multiplier=self.multiplier,
            max_backoff=duration.from_nanoseconds(round(self.max_backoff * 1e9)),
            max_attempts=self.max_attempts,
        )

    @classmethod
    def from_proto(cls, msg: events_pb2.RetryPolicy, field: str = "retry_policy") -> RetryPolicy:
        """Validate a requested policy; unset fields take the defaults."""
        d = cls()
        initial = (
            msg.initial_backoff.ToNanoseconds() / 1e9
            if msg.HasField("initial_backoff")
            else d.initial_backoff
        )
        maximum = (
            msg.max_backoff.ToNanoseconds() / 1e9 if msg.HasField("max_backoff") else d.max_backoff
        )
        maximum = max(maximum, initial) if not msg.HasField("max_backoff") else maximum
        policy = cls(
            initial_backoff=initial,
            multiplier=msg.multiplier or d.multiplier,
            max_backoff=maximum,
            max_attempts=msg.max_attempts or d.max_attempts,
        )
        bad: list[FieldViolation] = []
        if not 0 <= policy.initial_backoff <= MAX_BACKOFF_LIMIT:
            bad.append(FieldViolation(f"{field}.initial_backoff", "must be 0s to 24h"))
        if not 1.0 <= policy.multiplier <= 100.0:
            bad.append(FieldViolation(f"{field}.multiplier", "must be between 1.0 and 100"))
        if not policy.initial_backoff <= policy.max_backoff <= MAX_BACKOFF_LIMIT:
            bad.append(FieldViolation(f"{field}.max_backoff", "must be initial_backoff to 24h"))
        if not 1 <= policy.max_attempts <= MAX_ATTEMPTS_LIMIT:
            bad.append(FieldViolation(f"{field}.max_attempts", "must be 1 to 1000"))
        if bad:
            raise InvalidArgument(
                "invalid retry policy: " + "; ".join(f"{v.field} {v.description}" for v in bad),
                reason="INVALID_RETRY_POLICY",
                field_violations=bad,
            )
        return policy
