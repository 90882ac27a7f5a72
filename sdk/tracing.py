"""OpenTelemetry instrumentation of SDK calls.

One CLIENT span per call, covering all its attempts (each retry is an event
on it), named and attributed by the RPC semantic conventions. Its context
goes out as ``traceparent`` on every attempt, so the server's span joins the
same trace, and its trace id is what responses (``CallInfo``) and errors
(``AutoEcoOpsError.trace_id``) report.

A call always has a trace id, even in a program that set up no tracing: the
SDK then uses a private provider that samples nothing, so ids exist and
propagate but nothing is recorded or exported. Once the program installs a
tracer provider, the SDK's spans are that provider's.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

INSTRUMENTATION = "autoecoops.sdk"


class CallTracer:
    """Starts the span of each call on the current tracer provider."""

    __slots__ = ("_fallback", "_provider", "_tracer")

    def __init__(self) -> None:
        self._provider: object = None
        self._tracer: trace.Tracer | None = None
        self._fallback: trace.Tracer | None = None

    def _current(self) -> trace.Tracer:
        provider = trace.get_tracer_provider()
        if provider is not self._provider or self._tracer is None:
            self._provider = provider
            if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                self._tracer = self._private()
            else:
                self._tracer = provider.get_tracer(INSTRUMENTATION)
        return self._tracer

    def _private(self) -> trace.Tracer:
        if self._fallback is None:
            self._fallback = TracerProvider(sampler=ALWAYS_OFF).get_tracer(INSTRUMENTATION)
        return self._fallback

    def start(self, name: str, attributes: Mapping[str, str]) -> Span:
        """Start the span of one call, a child of the caller's current span."""
        span = self._current().start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        if not span.get_span_context().is_valid:
            # A provider that hands out invalid spans would leave the call
            # without a trace id; the private one always has one.
            span = self._private().start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        return span


def trace_id(span: Span) -> str:
    """The span's trace id as 32 hex digits."""
    return format(span.get_span_context().trace_id, "032x")


def trace_headers(span: Span) -> list[tuple[str, str]]:
    """The propagation headers (``traceparent``, ...) of ``span``, as metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def retried(span: Span, attempt: int, code: str, delay: float) -> None:
    """Record that attempt ``attempt`` failed with ``code`` and a retry follows."""
    if span.is_recording():
        span.add_event(
            "retry",
            {"rpc.attempt": attempt, "rpc.grpc.status_code": code, "retry.delay_s": delay},
        )


def finish(span: Span, code: int, message: str = "") -> None:
    """End the span with the call's final status code (0 is OK)."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code)
        if code:
            span.set_status(Status(StatusCode.ERROR, message))
    span.end()
