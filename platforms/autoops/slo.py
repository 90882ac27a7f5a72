"""SLO resources: names, validation, periods and the alert table of one SLO."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument
from autoecoops.platforms.autoops import burn

_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Ids the platform generates (alerts, remediations) may start with a digit.
_ANY_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MIN_PERIOD = burn.HOUR
MAX_PERIOD = 92 * burn.DAY
DEFAULT_PERIOD = 30 * burn.DAY


def check_id(value: str, field: str) -> None:
    """INVALID_ARGUMENT unless ``value`` is a valid resource id (AIP-122)."""
    if not _ID.match(value):
        raise InvalidArgument(
            f"{field} {value!r} must be 1-63 of [a-z0-9-], start with a letter and not end with -",
            reason="INVALID_RESOURCE_ID",
            field_violations=[FieldViolation(field, "1-63 of [a-z0-9-], starting with a letter")],
        )


def resource_name(collection: str, value: str, field: str) -> str:
    """The full name ``<collection>/<id>`` of ``value``; a bare id is accepted too."""
    if not value:
        raise InvalidArgument(
            f"{field} is required",
            reason="FIELD_REQUIRED",
            field_violations=[FieldViolation(field, "required field is missing")],
        )
    rid = value[len(collection) + 1 :] if value.startswith(collection + "/") else value
    if "/" in rid or not _ANY_ID.match(rid):
        raise InvalidArgument(
            f"{field} {value!r} is not a {collection} name ({collection}/<id>)",
            reason="INVALID_RESOURCE_NAME",
            field_violations=[FieldViolation(field, f"must be {collection}/<id>")],
        )
    return f"{collection}/{rid}"


def short_id(name: str) -> str:
    """The id part of a resource name."""
    return name.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Spec:
    """What the engine needs of one SLO."""

    name: str
    objective: float
    #: Length of the period in seconds (the whole calendar period for calendar ones).
    period: float
    rows: tuple[burn.Row, ...]
    resolve_ratio: float
    min_firing: float
    source: int
    calendar: int = 0
    alerting: bool = True

    def period_start(self, now: float) -> float:
        """Where the current period began (now - period for rolling ones)."""
        if not self.calendar:
            return now - self.period
        return calendar_start(self.calendar, now)


def calendar_start(unit: int, now: float) -> float:
    """The start (UTC) of the calendar day/week/month/quarter holding ``now``."""
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == pb.CALENDAR_UNIT_DAY:
        start = day
    elif unit == pb.CALENDAR_UNIT_WEEK:
        start = day - timedelta(days=day.weekday())
    elif unit == pb.CALENDAR_UNIT_MONTH:
        start = day.replace(day=1)
    else:
        start = day.replace(month=(t.month - 1) // 3 * 3 + 1, day=1)
    return start.timestamp()


def calendar_length(unit: int, now: float) -> float:
    """The full length of the calendar period holding ``now``, in seconds."""
    t = datetime.fromtimestamp(now, UTC)
    if unit == pb.CALENDAR_UNIT_DAY:
        return burn.DAY
    if unit == pb.CALENDAR_UNIT_WEEK:
        return 7 * burn.DAY
    if unit == pb.CALENDAR_UNIT_MONTH:
        return calendar.monthrange(t.year, t.month)[1] * burn.DAY
    first = (t.month - 1) // 3 * 3 + 1
    return sum(calendar.monthrange(t.year, m)[1] for m in range(first, first + 3)) * burn.DAY


def period_of(slo: pb.Slo, now: float) -> float:
    """The SLO's period in seconds."""
    tw = slo.time_window
    kind = tw.WhichOneof("kind")
    if kind == "rolling":
        return tw.rolling.ToNanoseconds() / 1e9
    if kind == "calendar":
        return calendar_length(tw.calendar, now)
    return DEFAULT_PERIOD


def rows_of(slo: pb.Slo, period: float) -> list[burn.Row]:
    """The SLO's burn-rate table: its own rows, or the defaults for its period."""
    if not slo.alert_policy.windows:
        return burn.default_rows(period)
    rows = []
    for w in slo.alert_policy.windows:
        long_w = w.long_window.ToNanoseconds() / 1e9
        rate = w.burn_rate or (
            burn.burn_rate_for(w.budget_consumed, long_w, period) if long_w > 0 else 0.0
        )
        rows.append(
            burn.Row(
                long_w,
                w.short_window.ToNanoseconds() / 1e9,
                rate,
                int(w.severity) or burn.SEVERITY_CRITICAL,
            )
        )
    return rows


def spec_of(slo: pb.Slo, now: float) -> Spec:
    """The engine's view of a stored SLO."""
    period = period_of(slo, now)
    policy = slo.alert_policy
    return Spec(
        name=slo.name,
        objective=slo.objective,
        period=period,
        rows=tuple(rows_of(slo, period)),
        resolve_ratio=policy.resolve_ratio or burn.DEFAULT_RESOLVE_RATIO,
        min_firing=policy.min_firing.ToNanoseconds() / 1e9,
        source=slo.indicator.source or pb.SLI_SOURCE_PUSHED,
        calendar=slo.time_window.calendar if slo.time_window.HasField("calendar") else 0,
        alerting=not policy.disabled,
    )


def validate(slo: pb.Slo, now: float, prefix: str = "slo") -> None:
    """INVALID_ARGUMENT with every field violation of ``slo``."""
    bad: list[FieldViolation] = []

    def v(field: str, why: str) -> None:
        bad.append(FieldViolation(f"{prefix}.{field}", why))

    if not slo.service:
        v("service", "required field is missing")
    elif len(slo.service) > 253:
        v("service", "at most 253 characters")
    if not 0.0 < slo.objective < 1.0:
        v("objective", "must be between 0 and 1 (exclusive), e.g. 0.999")
    ind = slo.indicator
    kind = ind.WhichOneof("kind")
    source = ind.source or pb.SLI_SOURCE_PUSHED
    if not slo.HasField("indicator"):
        v("indicator", "required field is missing")
    elif source not in (
        pb.SLI_SOURCE_PUSHED,
        pb.SLI_SOURCE_PROMETHEUS,
        pb.SLI_SOURCE_MESH,
        pb.SLI_SOURCE_APPLICATION_HEALTH,
    ):
        v("indicator.source", "unknown source")
    elif source == pb.SLI_SOURCE_APPLICATION_HEALTH and not ind.application:
        v("indicator.application", "required for APPLICATION_HEALTH")
    elif source == pb.SLI_SOURCE_PROMETHEUS:
        if kind == "ratio":
            r = ind.ratio
            if bool(r.good) == bool(r.bad):
                v("indicator.ratio", "exactly one of good and bad is needed for PROMETHEUS")
            if not r.total:
                v("indicator.ratio.total", "required for PROMETHEUS")
        elif kind == "threshold":
            if not ind.threshold.metric:
                v("indicator.threshold.metric", "required for PROMETHEUS")
        else:
            v("indicator", "a PROMETHEUS indicator needs ratio or threshold")
    elif source == pb.SLI_SOURCE_MESH and not ind.mesh.grpc_service:
        v("indicator.mesh.grpc_service", "required for MESH")
    if kind == "threshold" and ind.threshold.threshold.ToNanoseconds() <= 0:
        v("indicator.threshold.threshold", "must be positive")
    tw = slo.time_window
    if tw.WhichOneof("kind") == "rolling":
        secs = tw.rolling.ToNanoseconds() / 1e9
        if not MIN_PERIOD <= secs <= MAX_PERIOD:
            v("time_window.rolling", "must be between 1h and 92d")
    elif tw.WhichOneof("kind") == "calendar" and tw.calendar not in (
        pb.CALENDAR_UNIT_DAY,
        pb.CALENDAR_UNIT_WEEK,
        pb.CALENDAR_UNIT_MONTH,
        pb.CALENDAR_UNIT_QUARTER,
    ):
        v("time_window.calendar", "must be DAY, WEEK, MONTH or QUARTER")
    policy = slo.alert_policy
    if policy.resolve_ratio and not 0.0 < policy.resolve_ratio <= 1.0:
        v("alert_policy.resolve_ratio", "must be in (0, 1]")
    for i, w in enumerate(policy.windows):
        if w.burn_rate < 0 or w.budget_consumed < 0:
            v(f"alert_policy.windows[{i}]", "burn_rate and budget_consumed must not be negative")
        if w.burn_rate and w.budget_consumed:
            v(f"alert_policy.windows[{i}]", "give burn_rate or budget_consumed, not both")
    if not bad:
        period = period_of(slo, now)
        for problem in burn.rows_valid(rows_of(slo, period), period):
            field, _, why = problem.partition(": ")
            v(f"alert_policy.{field}", why)
    for key in slo.labels:
        if not key or len(key) > 63:
            v("labels", f"label key {key!r} must be 1-63 characters")
    if bad:
        raise InvalidArgument(
            f"the SLO is invalid: {bad[0].field}: {bad[0].description}",
            reason="INVALID_SLO",
            field_violations=bad,
        )
