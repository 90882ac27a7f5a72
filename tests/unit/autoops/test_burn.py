"""The burn-rate table, budgets and the alert state machine (no network, no Redis)."""

from __future__ import annotations

import pytest

from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.sources import dense, split_windows, window_counts

DAY, HOUR, MINUTE = burn.DAY, burn.HOUR, burn.MINUTE


def test_default_table_is_the_workbook_plus_sloths_row_for_30_days() -> None:
    rows = burn.default_rows(30 * DAY)
    assert [(r.long_window, r.short_window, r.burn_rate, r.page) for r in rows] == [
        (HOUR, 5 * MINUTE, 14.4, True),
        (6 * HOUR, 30 * MINUTE, 6.0, True),
        (DAY, 2 * HOUR, 3.0, False),
        (3 * DAY, 6 * HOUR, 1.0, False),
    ]


def test_workbook_budget_consumed_figures_follow_from_the_rates() -> None:
    # SRE Workbook ch. 5, table 5-8: 2% in 1h, 5% in 6h, 10% in 3d of a 30-day budget.
    period = 30 * DAY
    rows = burn.default_rows(period)
    consumed = {burn.window_label(r.long_window): r.budget_consumed(period) for r in rows}
    assert consumed["1h"] == pytest.approx(0.02)
    assert consumed["6h"] == pytest.approx(0.05)
    assert consumed["3d"] == pytest.approx(0.10)
    assert consumed["1d"] == pytest.approx(0.10)
    # And the other way: a budget fraction gives the workbook's rate.
    assert burn.burn_rate_for(0.02, HOUR, period) == pytest.approx(14.4)
    assert burn.burn_rate_for(0.05, 6 * HOUR, period) == pytest.approx(6.0)
    assert burn.burn_rate_for(0.10, 3 * DAY, period) == pytest.approx(1.0)


def test_the_table_generalises_to_other_periods() -> None:
    rows = burn.default_rows(28 * DAY)
    # Windows scale with the period; the budget spent per row stays the same.
    assert rows[0].long_window == pytest.approx(HOUR * 28 / 30)
    assert rows[0].budget_consumed(28 * DAY) == pytest.approx(0.02)
    assert rows[0].burn_rate == pytest.approx(14.4)
    week = burn.default_rows(7 * DAY)
    assert [round(r.budget_consumed(7 * DAY), 6) for r in week] == [0.02, 0.05, 0.1, 0.1]


def test_burn_rate_is_error_rate_over_allowed_rate() -> None:
    assert burn.burn_rate(bad=10, total=1000, objective=0.999) == pytest.approx(10.0)
    assert burn.burn_rate(bad=0, total=0, objective=0.999) == 0.0


def test_an_alert_fires_only_when_both_windows_exceed() -> None:
    page = burn.default_rows()[0]
    assert not burn.step(page, 20.0, 10.0, firing=False).firing  # short window under
    assert not burn.step(page, 10.0, 20.0, firing=False).firing  # long window under
    fired = burn.step(page, 15.0, 15.0, firing=False)
    assert fired.firing and fired.changed


def test_resolution_has_hysteresis_and_a_minimum_firing_time() -> None:
    page = burn.default_rows()[0]
    # Just under the threshold is not enough to resolve (flapping guard)...
    assert burn.step(page, 14.0, 14.0, firing=True).firing
    # ...under threshold x resolve_ratio on either window is.
    out = burn.step(page, 30.0, 12.0, firing=True)
    assert not out.firing and out.changed
    # Not before it fired for min_firing.
    assert burn.step(page, 1.0, 1.0, firing=True, fired_for=30, min_firing=60).firing


def test_budget_remaining_and_exhaustion() -> None:
    counts = burn.Counts(good=999_500, total=1_000_000)  # 0.05% errors against 0.1% allowed
    b = burn.budget(0.999, 30 * DAY, counts, recent_burn=2.0)
    assert b.consumed == pytest.approx(0.5)
    assert b.remaining == pytest.approx(0.5)
    assert b.budget_events == pytest.approx(1000)
    # Half the budget left, burning 2x: 0.5 * 30d / 2 = 7.5 days.
    assert b.exhaustion_in == pytest.approx(7.5 * DAY)
    assert burn.budget(0.999, 30 * DAY, counts, recent_burn=0.0).exhaustion_in is None


def test_window_counts_sum_minute_and_hour_buckets() -> None:
    now = 1_000_000 * 60.0 + 30  # half way into a minute
    minute = int(now // 60)
    fine = {minute - i: (9, 10) for i in range(120)}  # two hours of 10 events a minute
    fine[minute - 500] = (0, 1000)  # outside every window: never counted
    hour = int(now // 3600)
    coarse = {hour - i: (590, 600) for i in range(72)}
    windows = [5 * MINUTE, HOUR, 3 * DAY]
    _, fine_span, _, coarse_span = split_windows(windows, 12 * HOUR)
    assert (fine_span, coarse_span) == (60, 72)
    got = window_counts(
        dense(fine, minute, fine_span), dense(coarse, hour, coarse_span), windows, 12 * HOUR
    )
    assert got[5 * MINUTE] == burn.Counts(45, 50)
    assert got[HOUR] == burn.Counts(540, 600)
    assert got[3 * DAY] == burn.Counts(590 * 72, 600 * 72)


def test_rows_are_checked() -> None:
    bad = [burn.Row(5 * MINUTE, HOUR, 14.4, 5), burn.Row(40 * DAY, HOUR, 1, 3)]
    problems = burn.rows_valid(bad, 30 * DAY)
    assert any("shorter" in p for p in problems) and any(
        "longer than the period" in p for p in problems
    )


def test_calendar_periods_start_and_last_as_the_calendar_says() -> None:
    from datetime import UTC, datetime

    from autoecoops.autoops.v1 import autoops_pb2 as pb
    from autoecoops.platforms.autoops.slo import calendar_length, calendar_start

    now = datetime(2026, 2, 18, 15, 30, tzinfo=UTC).timestamp()  # a Wednesday
    assert (
        calendar_start(pb.CALENDAR_UNIT_DAY, now) == datetime(2026, 2, 18, tzinfo=UTC).timestamp()
    )
    assert (
        calendar_start(pb.CALENDAR_UNIT_WEEK, now) == datetime(2026, 2, 16, tzinfo=UTC).timestamp()
    )
    assert (
        calendar_start(pb.CALENDAR_UNIT_MONTH, now) == datetime(2026, 2, 1, tzinfo=UTC).timestamp()
    )
    assert (
        calendar_start(pb.CALENDAR_UNIT_QUARTER, now)
        == datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    )
    assert calendar_length(pb.CALENDAR_UNIT_MONTH, now) == 28 * DAY
    assert calendar_length(pb.CALENDAR_UNIT_QUARTER, now) == 90 * DAY
    assert calendar_length(pb.CALENDAR_UNIT_WEEK, now) == 7 * DAY
