"""The one exponential backoff of the project: server-side retry loops, the
event-bus's retry policy, infra-manager's sync retries and the SDK's retries
all take their waits from here.

``exponential_delay(n)`` is ``min(initial * multiplier^(n-1), maximum)`` for
retry ``n`` (1 is the first retry), safe against overflow however long
something keeps failing. ``Backoff`` is the stateful form a retry loop keeps:
``next()`` the wait before the next try, ``reset()`` after a success.
"""

from __future__ import annotations

import math


def exponential_delay(
    retry: int, initial: float, multiplier: float = 2.0, maximum: float = math.inf
) -> float:
    """The un-jittered wait before retry number ``retry`` (1-based), in seconds."""
    exponent = max(retry - 1, 0)
    try:
        # The exponent is capped so a long-failing loop cannot overflow.
        grown = initial * multiplier ** min(exponent, 1000)
    except OverflowError:
        grown = math.inf
    return float(min(grown, maximum))


class Backoff:
    """The waits of one retry loop: ``initial``, then growing by ``multiplier`` up to ``maximum``."""

    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.retries = 0

    def peek(self) -> float:
        """The wait ``next()`` will return."""
        return exponential_delay(self.retries + 1, self.initial, self.multiplier, self.maximum)

    def next(self) -> float:
        """The wait before the next try; each call grows the following one."""
        self.retries += 1
        return exponential_delay(self.retries, self.initial, self.multiplier, self.maximum)

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self.retries = 0
