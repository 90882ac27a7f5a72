"""Time and randomness as the SDK sees them, in one place so tests can fake them.

Deadlines use ``monotonic``, token expiry uses ``time`` (JWT ``exp`` is wall
time), backoff jitter uses ``random``. ``sleep``/``async_sleep`` left as
None mean the client's own wait, which ``close()`` interrupts.
"""

from __future__ import annotations

import random as _random
import time as _time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    """The sources of time and randomness of one client."""

    #: Seconds on a clock that never jumps; deadlines are measured on it.
    monotonic: Callable[[], float] = _time.monotonic
    #: Epoch seconds; token expiry is measured on it.
    time: Callable[[], float] = _time.time
    #: A float in [0, 1) for backoff jitter.
    random: Callable[[], float] = _random.random
    #: Waits between attempts of the sync client (None: its interruptible wait).
    sleep: Callable[[float], None] | None = None
    #: Waits between attempts of the async client (None: its interruptible wait).
    async_sleep: Callable[[float], Awaitable[None]] | None = None


SYSTEM = Clock()
