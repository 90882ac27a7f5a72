"""Error budgets and multiwindow, multi-burn-rate alerting (Google SRE Workbook, ch. 5).

Plain Python, no gRPC or Redis: the engine feeds it window counts and the
previous alert state, and it answers with burn rates, budgets and the next
state. The default table is the workbook's, plus Sloth's 3x over 1d/2h
ticket row, stated as budget consumed over the long window so it scales to
any period (a 30-day period gives the workbook's 14.4 / 6 / 3 / 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
#: The period the workbook's table is written for.
REFERENCE_PERIOD = 30 * DAY

#: Severity values of autoecoops.common.v1.Severity (kept numeric so this
#: module stays free of generated code).
SEVERITY_MEDIUM = 3
SEVERITY_CRITICAL = 5

#: A firing alert resolves once a window falls under threshold x this.
DEFAULT_RESOLVE_RATIO = 0.9


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the burn-rate table: fire when both windows burn faster than ``burn_rate``."""

    long_window: float
    short_window: float
    burn_rate: float
    severity: int

    @property
    def page(self) -> bool:
        """True for rows that page (CRITICAL/HIGH), False for tickets."""
        return self.severity >= 4

    def budget_consumed(self, period: float) -> float:
        """The fraction of the period's budget spent when the long window burns at the rate."""
        return self.burn_rate * self.long_window / period


def burn_rate_for(budget_consumed: float, long_window: float, period: float) -> float:
    """The burn rate that spends ``budget_consumed`` of the budget over ``long_window``."""
    return budget_consumed * period / long_window


#: (budget consumed, long window, short window, severity) for a 30-day period.
_WORKBOOK = (
    (0.02, 1 * HOUR, 5 * MINUTE, SEVERITY_CRITICAL),
    (0.05, 6 * HOUR, 30 * MINUTE, SEVERITY_CRITICAL),
    (0.10, 1 * DAY, 2 * HOUR, SEVERITY_MEDIUM),
    (0.10, 3 * DAY, 6 * HOUR, SEVERITY_MEDIUM),
)


def default_rows(period: float = REFERENCE_PERIOD) -> list[Row]:
    """The workbook table (plus Sloth's 1d/2h row) for ``period``.

    Windows scale with the period as Sloth scales them, and the burn rates
    follow from the same budget fractions, so a 30-day period gives exactly
    14.4x 1h/5m, 6x 6h/30m, 3x 1d/2h and 1x 3d/6h.
    """
    scale = period / REFERENCE_PERIOD
    rows = []
    for consumed, long_w, short_w, severity in _WORKBOOK:
        lw, sw = long_w * scale, short_w * scale
        rows.append(Row(lw, sw, round(burn_rate_for(consumed, lw, period), 6), severity))
    return rows


def burn_rate(bad: float, total: float, objective: float) -> float:
    """Error rate over a window divided by the sustainable one (1 - objective); 0 without events."""
    if total <= 0:
        return 0.0
    return (bad / total) / (1.0 - objective)


class Counts(NamedTuple):
    """Good and total events over one window (a tuple: 10,000 SLOs make 70,000 a tick)."""

    good: float
    total: float

    @property
    def bad(self) -> float:
        """Events that were not good."""
        return max(self.total - self.good, 0.0)


@dataclass(frozen=True, slots=True)
class Budget:
    """An SLO's error budget at one moment."""

    objective: float
    period: float
    good: float
    total: float
    #: Fraction of the budget spent (above 1 when overspent).
    consumed: float
    #: 1 - consumed.
    remaining: float
    #: Bad events the period may have at the traffic seen so far.
    budget_events: float
    #: Seconds until the budget is gone at ``recent_burn``; None if not burning or gone.
    exhaustion_in: float | None

    @property
    def sli(self) -> float:
        """good / total (1 without events)."""
        return self.good / self.total if self.total > 0 else 1.0


def budget(objective: float, period: float, period_counts: Counts, recent_burn: float) -> Budget:
    """The budget over the period and when it runs out at ``recent_burn``.

    Consumption is the error ratio over the period divided by the allowed
    one (Sloth's and Pyrra's definition), so it does not depend on how much
    of a calendar period has passed. At burn rate b a fraction
    b x dt / period of the budget goes in dt seconds.
    """
    allowed = 1.0 - objective
    total, bad = period_counts.total, period_counts.bad
    consumed = (bad / total) / allowed if total > 0 else 0.0
    remaining = 1.0 - consumed
    exhaustion: float | None = None
    if recent_burn > 0 and remaining > 0:
        exhaustion = remaining * period / recent_burn
    return Budget(
        objective,
        period,
        period_counts.good,
        total,
        consumed,
        remaining,
        allowed * total,
        exhaustion,
    )


class RowState(NamedTuple):
    """Where one row's alert stands after an evaluation."""

    firing: bool
    long_burn: float
    short_burn: float
    #: True when this evaluation changed ``firing``.
    changed: bool


def step(
    row: Row,
    long_burn: float,
    short_burn: float,
    firing: bool,
    *,
    resolve_ratio: float = DEFAULT_RESOLVE_RATIO,
    fired_for: float = math.inf,
    min_firing: float = 0.0,
) -> RowState:
    """The next state of one row's alert.

    It fires only when both windows exceed the rate; once firing, it resolves
    when either window drops under rate x ``resolve_ratio`` (the short window
    is what makes it reset fast) and it has fired at least ``min_firing``.
    """
    threshold = row.burn_rate
    if not firing:
        now = long_burn > threshold and short_burn > threshold
    else:
        low = threshold * resolve_ratio
        now = not ((long_burn < low or short_burn < low) and fired_for >= min_firing)
    return RowState(now, long_burn, short_burn, now != firing)


def assess(
    rows: Sequence[Row],
    objective: float,
    counts: Mapping[float, Counts],
    fired_at: Mapping[int, float],
    now: float,
    *,
    resolve_ratio: float = DEFAULT_RESOLVE_RATIO,
    min_firing: float = 0.0,
) -> list[tuple[int, RowState]]:
    """Step every row of an SLO's table; ``fired_at`` maps firing rows to their fire time."""
    out = []
    for i, row in enumerate(rows):
        long_c, short_c = counts[row.long_window], counts[row.short_window]
        firing = i in fired_at
        out.append(
            (
                i,
                step(
                    row,
                    burn_rate(long_c.bad, long_c.total, objective),
                    burn_rate(short_c.bad, short_c.total, objective),
                    firing,
                    resolve_ratio=resolve_ratio,
                    fired_for=now - fired_at[i] if firing else 0.0,
                    min_firing=min_firing,
                ),
            )
        )
    return out


def windows_of(rows: Iterable[Row]) -> list[float]:
    """Every distinct window the rows need, shortest first."""
    return sorted({w for r in rows for w in (r.long_window, r.short_window)})


def window_label(seconds: float) -> str:
    """A Prometheus duration for a window: 5m, 1h, 3d (whole units only)."""
    s = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0 and s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def rows_valid(rows: Sequence[Row], period: float) -> list[str]:
    """What is wrong with a table (empty when nothing)."""
    problems = []
    for i, r in enumerate(rows):
        if r.short_window <= 0 or r.long_window <= 0:
            problems.append(f"windows[{i}]: windows must be positive")
        elif r.short_window >= r.long_window:
            problems.append(f"windows[{i}]: short_window must be shorter than long_window")
        if r.long_window > period:
            problems.append(f"windows[{i}]: long_window is longer than the period")
        if r.burn_rate <= 0:
            problems.append(f"windows[{i}]: burn_rate (or budget_consumed) must be positive")
    return problems
