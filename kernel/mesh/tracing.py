"""OpenTelemetry set-up: one tracer provider per process, exporting where the
standard ``OTEL_*`` variables say.

Every call gets a trace context, so trace ids exist for errors and audit
entries and ``traceparent`` flows across hops. Spans are *recorded* only when
something exports them, since recording spans nobody reads costs about a
fifth of a bare RPC's throughput (bench/bench_runtime.py):

- OTLP over gRPC (``opentelemetry-exporter-otlp-proto-grpc``) when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set, or ``OTEL_TRACES_EXPORTER`` names ``otlp``. The exporter reads the rest
  of its settings (headers, TLS, timeout, compression) from the standard
  variables, and the batch processor its own (``OTEL_BSP_*``).
- the console when ``OTEL_TRACES_EXPORTER`` names ``console`` or
  ``AUTOECOOPS_TRACE_CONSOLE=1``.
- nothing with ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``.

``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` override the service
name the process gives itself; ``OTEL_TRACES_SAMPLER`` picks the sampler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

log = logging.getLogger("autoecoops.tracing")
_provider: TracerProvider | None = None
_recording = False


def recording() -> bool:
    """Whether spans are recorded (and so worth building with the SDK's tracer)."""
    return _recording


def exporters_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the standard variables ask for: 'otlp', 'console' or none."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if "none" in named:
        return []
    wanted = [n for n in named if n in ("otlp", "console")]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint and not named and "otlp" not in wanted:
        wanted.append("otlp")
    if env.get("AUTOECOOPS_TRACE_CONSOLE") == "1" and "console" not in wanted:
        wanted.append("console")
    return wanted


def _otlp() -> SpanExporter:
    # Imported here: only a process that exports pays for the exporter's import.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup_tracing(service_name: str, export: bool = False) -> TracerProvider:
    """Install (once) and return the process's tracer provider."""
    global _provider, _recording
    if _provider is None:
        exporters = exporters_from_env()
        record = export or bool(exporters) or "OTEL_TRACES_SAMPLER" in os.environ
        _recording = record
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
        _provider = TracerProvider(
            # Resource.create adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME.
            resource=Resource.create(attributes),
            # None lets the SDK pick its default (or OTEL_TRACES_SAMPLER).
            sampler=None if record else ALWAYS_OFF,
        )
        if "otlp" in exporters:
            _provider.add_span_processor(BatchSpanProcessor(_otlp()))
            log.info("exporting traces over OTLP to %s", _endpoint())
        if "console" in exporters:
            _provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(_provider)
    return _provider


def _endpoint() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4317"
    )


def flush_tracing(timeout: float = 5.0) -> None:
    """Export the spans still queued (on shutdown, so the last calls' spans are not lost)."""
    if _provider is not None and _recording:
        try:
            _provider.force_flush(int(timeout * 1000))
        except Exception:  # an exporter's failure must not fail a shutdown
            log.warning("could not flush the last spans", exc_info=True)
