"""OpenTelemetry set-up: one tracer provider per process.

Every call gets a trace context, so trace ids exist for errors and audit
entries and ``traceparent`` flows across hops. Spans are *recorded* only when
something exports them: ``AUTOECOOPS_TRACE_CONSOLE=1`` prints them, and a
deployment that adds an exporter calls ``setup_tracing(..., export=True)`` or
sets ``OTEL_TRACES_SAMPLER``. Recording spans nobody reads cost about a
fifth of a bare RPC's throughput (bench/bench_runtime.py).
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

_provider: TracerProvider | None = None
_recording = False


def recording() -> bool:
    """Whether spans are recorded (and so worth building with the SDK's tracer)."""
    return _recording


def setup_tracing(service_name: str, export: bool = False) -> TracerProvider:
    """Install (once) and return the process's tracer provider."""
    global _provider, _recording
    if _provider is None:
        console = os.environ.get("AUTOECOOPS_TRACE_CONSOLE") == "1"
        record = export or console or "OTEL_TRACES_SAMPLER" in os.environ
        _recording = record
        _provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            # None lets the SDK pick its default (or OTEL_TRACES_SAMPLER).
            sampler=None if record else ALWAYS_OFF,
        )
        if console:
            _provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(_provider)
    return _provider
