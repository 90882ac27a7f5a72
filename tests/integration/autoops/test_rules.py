"""The generated Prometheus rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import duration_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.platforms.autoops import rules

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: ./dev test installs Debian's prometheus package"
)


def availability() -> pb.Slo:
    return pb.Slo(
        name="slos/checkout-availability",
        service="checkout",
        objective=0.999,
        labels={"team": "payments"},
        indicator=pb.Indicator(
            source=pb.SLI_SOURCE_PROMETHEUS,
            ratio=pb.RatioIndicator(
                bad='http_requests_total{code=~"5.."}', total="http_requests_total"
            ),
        ),
    )


def latency() -> pb.Slo:
    return pb.Slo(
        name="slos/api-latency",
        service="api",
        objective=0.99,
        time_window=pb.TimeWindow(rolling=duration_pb2.Duration(seconds=28 * 86400)),
        indicator=pb.Indicator(
            source=pb.SLI_SOURCE_PROMETHEUS,
            threshold=pb.ThresholdIndicator(
                metric='http_request_duration_seconds{job="api"}',
                threshold=duration_pb2.Duration(nanos=300_000_000),
            ),
        ),
    )


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_generated_rules_pass_promtool_check_with_sloth_names(tmp_path: Path) -> None:
    text = rules.render([availability(), latency()], time.time())
    (tmp_path / "rules.yaml").write_text(text)
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    doc = yaml.safe_load(text)
    records = {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    for name in (
        "slo:sli_error:ratio_rate5m",
        "slo:sli_error:ratio_rate30m",
        "slo:sli_error:ratio_rate1h",
        "slo:sli_error:ratio_rate2h",
        "slo:sli_error:ratio_rate6h",
        "slo:sli_error:ratio_rate1d",
        "slo:sli_error:ratio_rate3d",
        "slo:sli_error:ratio_rate30d",
        "slo:objective:ratio",
        "slo:error_budget:ratio",
        "slo:time_period:days",
        "slo:current_burn_rate:ratio",
        "slo:period_burn_rate:ratio",
        "slo:period_error_budget_remaining:ratio",
        "sloth_slo_info",
    ):
        assert name in records
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "CheckoutAvailabilityPageAlert",
        "CheckoutAvailabilityTicketAlert",
        "ApiLatencyPageAlert",
        "ApiLatencyTicketAlert",
    }


def test_promtool_unit_tests_fire_and_resolve_the_alerts(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(rules.render([availability(), latency()], time.time()))
    labels = {
        "sloth_id": "checkout-checkout-availability",
        "sloth_service": "checkout",
        "sloth_slo": "checkout-availability",
        "team": "payments",
    }
    page = {
        "exp_labels": {**labels, "sloth_severity": "page"},
        "exp_annotations": {
            "summary": "checkout checkout-availability SLO error budget burn rate is over expected.",
            "title": "(page) checkout checkout-availability SLO error budget burn rate is too fast.",
        },
    }
    slow = {
        "exp_labels": {
            "sloth_id": "api-api-latency",
            "sloth_service": "api",
            "sloth_slo": "api-latency",
            "sloth_severity": "page",
        },
        "exp_annotations": {
            "summary": "api api-latency SLO error budget burn rate is over expected.",
            "title": "(page) api api-latency SLO error budget burn rate is too fast.",
        },
    }
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # No errors for an hour, then 10% for an hour (burn 100x a
                    # 99.9% objective), then none again.
                    {
                        "series": 'http_requests_total{code="500"}',
                        "values": "0+0x60 0+10x60 600+0x180",
                    },
                    {"series": 'http_requests_total{code="200"}', "values": "0+90x300"},
                    # Latency: half the requests over 300ms in the second hour.
                    {
                        "series": 'http_request_duration_seconds_bucket{job="api",le="0.3"}',
                        "values": "0+100x60 6000+50x60 9000+100x180",
                    },
                    {
                        "series": 'http_request_duration_seconds_count{job="api"}',
                        "values": "0+100x300",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "50m",
                        "alertname": "CheckoutAvailabilityPageAlert",
                        "exp_alerts": [],
                    },
                    {"eval_time": "50m", "alertname": "ApiLatencyPageAlert", "exp_alerts": []},
                    {
                        "eval_time": "70m",
                        "alertname": "CheckoutAvailabilityPageAlert",
                        "exp_alerts": [page],
                    },
                    {"eval_time": "70m", "alertname": "ApiLatencyPageAlert", "exp_alerts": [slow]},
                    # Ten minutes after the errors stop the 5m window is clear, but
                    # the 6h/30m row still burns: still paging...
                    {
                        "eval_time": "130m",
                        "alertname": "CheckoutAvailabilityPageAlert",
                        "exp_alerts": [page],
                    },
                    # ...and once its 30m window clears too, the page resolves.
                    {
                        "eval_time": "155m",
                        "alertname": "CheckoutAvailabilityPageAlert",
                        "exp_alerts": [],
                    },
                    {"eval_time": "155m", "alertname": "ApiLatencyPageAlert", "exp_alerts": []},
                ],
                "promql_expr_test": [
                    {
                        "expr": 'slo:sli_error:ratio_rate5m{sloth_slo="checkout-availability"}',
                        "eval_time": "100m",
                        "exp_samples": [
                            {
                                "labels": 'slo:sli_error:ratio_rate5m{sloth_id="checkout-checkout-availability",sloth_service="checkout",sloth_slo="checkout-availability",sloth_window="5m"}',
                                "value": 0.1,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    tested = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_wrong_expectation_makes_promtool_fail(tmp_path: Path) -> None:
    """The unit tests above can fail: an alert that should not fire is reported."""
    (tmp_path / "rules.yaml").write_text(rules.render([availability()], time.time()))
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'http_requests_total{code="500"}', "values": "0+10x120"},
                    {"series": 'http_requests_total{code="200"}', "values": "0+90x120"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "70m",
                        "alertname": "CheckoutAvailabilityPageAlert",
                        "exp_alerts": [],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec))
    tested = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert tested.returncode != 0
