"""OpenTelemetry instrumentation of SDK calls.

One CLIENT span per call, covering all its attempts (each retry is an event
on it), named and attributed by the RPC semantic conventions. Its context
goes out as ``traceparent`` on every attempt, so the server's span joins the
same trace, and its trace id is what responses (``CallInfo``) and errors
(``AutoEcoOpsError.trace_id``) report.

A call always has a trace id, even in a program that set up no tracing: the
SDK then makes non-recording spans itself (what a provider that samples
nothing would make, at a fraction of the cost), so ids exist and propagate
but nothing is recorded or exported. Once the program installs a tracer
provider, the SDK's spans are that provider's.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

INSTRUMENTATION = "autoecoops.sdk"


class CallTracer:
    """Starts the span of each call on the current tracer provider."""

    __slots__ = ("_provider", "_tracer")

    def __init__(self) -> None:
        self._provider: object = None
        self._tracer: trace.Tracer | None = None

    def _current(self) -> trace.Tracer | None:
        provider = trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider = provider
            # No provider installed (the API's proxy) or a no-op one: the SDK
            # makes its own non-recording spans.
            noop = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
            self._tracer = None if noop else provider.get_tracer(INSTRUMENTATION)
        return self._tracer

    def start(self, name: str, attributes: Mapping[str, str]) -> Span:
        """Start the span of one call, a child of the caller's current span."""
        tracer = self._current()
        if tracer is not None:
            span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
            if span.get_span_context().is_valid:
                return span
        return _non_recording()


def _non_recording() -> Span:
    """A span with fresh ids that records nothing, in the current trace if there is one."""
    parent = trace.get_current_span().get_span_context()
    trace_id = parent.trace_id if parent.is_valid else _random_id(128, INVALID_TRACE_ID)
    return NonRecordingSpan(
        SpanContext(
            trace_id,
            _random_id(64, INVALID_SPAN_ID),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
            trace_state=parent.trace_state if parent.is_valid else None,
        )
    )


def _random_id(bits: int, invalid: int) -> int:
    # As OpenTelemetry's RandomIdGenerator: random bits, never the invalid id.
    value = random.getrandbits(bits)
    while value == invalid:
        value = random.getrandbits(bits)
    return value


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
