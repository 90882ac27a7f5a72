"""Trace ids without any OpenTelemetry set-up, and with a provider installed."""

from __future__ import annotations

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider

from autoecoops.sdk.tracing import CallTracer, trace_headers, trace_id

REMOTE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_without_a_provider_every_call_still_has_a_trace_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    tracer = CallTracer()
    first, second = tracer.start("a.B/C", {}), tracer.start("a.B/C", {})
    assert not first.is_recording()
    assert len(trace_id(first)) == 32 and trace_id(first) != "0" * 32
    assert trace_id(first) != trace_id(second)
    header = dict(trace_headers(first))["traceparent"]
    version, tid, sid, flags = header.split("-")
    assert (version, tid, flags) == ("00", trace_id(first), "00")
    assert sid == format(first.get_span_context().span_id, "016x")
    # Inside a context taken from an incoming request, the call joins that trace.
    incoming = propagate.extract({"traceparent": f"00-{REMOTE_TRACE}-00f067aa0ba902b7-01"})
    token = context.attach(incoming)
    try:
        joined = tracer.start("a.B/C", {})
    finally:
        context.detach(token)
    assert trace_id(joined) == REMOTE_TRACE
    assert joined.get_span_context().span_id != 0x00F067AA0BA902B7


def test_with_a_provider_the_calls_spans_are_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    tracer = CallTracer()
    parent = provider.get_tracer("test").start_span("user operation")
    with trace.use_span(parent, end_on_exit=True):
        span = tracer.start("a.B/C", {"rpc.system": "grpc"})
    assert span.is_recording()
    assert trace_id(span) == format(parent.get_span_context().trace_id, "032x")
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id  # type: ignore[attr-defined]
    span.end()
