"""Which exporters the standard OTEL_* variables ask for."""

from __future__ import annotations

import pytest

from autoecoops.kernel.mesh.tracing import exporters_from_env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"AUTOECOOPS_TRACE_CONSOLE": "1"}, ["console"]),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "AUTOECOOPS_TRACE_CONSOLE": "1"},
            ["otlp", "console"],
        ),
    ],
)
def test_exporters_follow_the_standard_variables(env: dict[str, str], expected: list[str]) -> None:
    assert exporters_from_env(env) == expected
