"""OpenSLO v1 documents in the shapes other tools write, and what is refused."""

from __future__ import annotations

import time

import pytest
import yaml

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.common.v1 import types_pb2
from autoecoops.kernel.mesh.errors import InvalidArgument
from autoecoops.platforms.autoops import openslo

LATENCY = """
apiVersion: openslo/v1
kind: Service
metadata: {name: api}
spec: {description: the public API}
---
apiVersion: openslo/v1
kind: AlertCondition
metadata: {name: fast-burn}
spec:
  severity: page
  condition: {kind: burnrate, op: gte, threshold: 14.4, lookbackWindow: 1h, alertAfter: 5m}
---
apiVersion: openslo/v1
kind: AlertPolicy
metadata: {name: api-alerts}
spec:
  alertWhenBreaching: true
  conditions:
    - conditionRef: fast-burn
    - kind: AlertCondition
      metadata: {name: slow-burn}
      spec:
        severity: ticket
        condition: {kind: burnrate, op: gte, threshold: 1, lookbackWindow: 3d, alertAfter: 6h}
---
apiVersion: openslo/v1
kind: SLO
metadata:
  name: api-latency
  labels: {tier: [gold, external]}
  annotations: {openslo.com/owner: team-api}
spec:
  service: api
  indicator:
    metadata: {name: api-latency-sli}
    spec:
      thresholdMetric:
        metricSource: {type: Prometheus, spec: {query: 'http_request_duration_seconds{job="api"}'}}
  timeWindow: [{duration: 1M, isRolling: false, calendar: {startTime: "2024-01-01 00:00:00", timeZone: UTC}}]
  budgetingMethod: Occurrences
  objectives: [{displayName: fast, op: lte, value: 0.3, targetPercent: 99.5}]
  alertPolicies: [api-alerts]
"""


def test_a_threshold_slo_with_a_calendar_month_and_referenced_conditions() -> None:
    ((sid, slo),) = openslo.parse(LATENCY, time.time())
    assert sid == "api-latency" and slo.objective == pytest.approx(0.995)
    assert slo.indicator.source == pb.SLI_SOURCE_PROMETHEUS
    assert slo.indicator.threshold.metric == 'http_request_duration_seconds{job="api"}'
    assert slo.indicator.threshold.threshold.ToNanoseconds() == 300_000_000
    assert slo.time_window.calendar == pb.CALENDAR_UNIT_MONTH
    assert slo.labels["tier"] == "gold,external" and slo.owner == "team-api"
    rows = [
        (w.burn_rate, w.long_window.seconds, w.short_window.seconds, w.severity)
        for w in slo.alert_policy.windows
    ]
    assert rows == [
        (14.4, 3600, 300, types_pb2.SEVERITY_CRITICAL),
        (1.0, 3 * 86400, 6 * 3600, types_pb2.SEVERITY_MEDIUM),
    ]


def test_export_then_import_gives_the_same_slo() -> None:
    ((_, slo),) = openslo.parse(LATENCY, time.time())
    again = openslo.parse(openslo.export([slo]), time.time())
    assert again[0][1].indicator == slo.indicator
    assert again[0][1].objective == slo.objective and again[0][1].time_window == slo.time_window
    assert list(again[0][1].alert_policy.windows) == list(slo.alert_policy.windows)
    kinds = [d["kind"] for d in yaml.safe_load_all(openslo.export([slo]))]
    assert kinds == ["SLO", "AlertPolicy"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda t: t.replace(
                "apiVersion: openslo/v1\nkind: Service", "apiVersion: openslo/v2\nkind: Service"
            ),
            "yaml.documents[0].apiVersion",
        ),
        (lambda t: t.replace("conditionRef: fast-burn", "conditionRef: nope"), "conditionRef"),
        (lambda t: t.replace("type: Prometheus", "type: Datadog"), "metricSource.type"),
        (
            lambda t: t.replace("duration: 1M, isRolling: false", "duration: 5M, isRolling: false"),
            "timeWindow[0].duration",
        ),
        (lambda t: t.replace("targetPercent: 99.5", "targetPercent: 150"), "objective"),
        (lambda t: t.replace("lookbackWindow: 1h", "lookbackWindow: an hour"), "lookbackWindow"),
    ],
)
def test_what_cannot_be_read_is_invalid_argument_naming_where(change: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        openslo.parse(change(LATENCY), time.time())  # type: ignore[operator]
    assert any(field in v.field for v in err.value.field_violations), err.value.field_violations
