"""infra-manager's events on the event-bus: sync started/succeeded/failed, drift, rollback.

Each event is its proto message packed into a CloudEvents-shaped Envelope
and sent with event-bus's Publish through the mesh's client factory (the
service's own token, the propagated deadline and trace). The idempotency key
is derived from the operation (or the drift's signature), so a retried
publish is stored once. The topic and type come from the message's
``(autoecoops.common.v1.event)`` option, never from a table here.

A sync has already happened when its event is published, so a publish that
keeps failing is logged and counted, not allowed to fail the operation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc
from google.protobuf import message, timestamp_pb2
from opentelemetry import trace

from autoecoops.common.v1 import options_pb2
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout

log = logging.getLogger("autoecoops.infra_manager")
SOURCE = "//autoecoops/kernel/infra-manager"
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class EventSink(Protocol):
    """Where infra-manager's events go."""

    async def publish(self, payload: message.Message, *, app: str, key: str) -> bool:
        """Publish one event about ``app``; True once stored (or already stored)."""
        ...


def event_topic(payload: message.Message) -> tuple[str, str]:
    """(type, topic) from the payload's event option."""
    spec = payload.DESCRIPTOR.GetOptions().Extensions[options_pb2.event]
    if not spec.type or not spec.topic:
        raise ValueError(f"{payload.DESCRIPTOR.full_name} is not an event payload")
    return spec.type, spec.topic


def _traceparent() -> str:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""  # the bus takes the publish call's own trace
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def envelope(payload: message.Message, *, app: str, key: str) -> tuple[str, envelope_pb2.Envelope]:
    """The topic and the envelope of one event."""
    type_, topic = event_topic(payload)
    env = envelope_pb2.Envelope(
        source=SOURCE,
        type=type_,
        subject=app,
        resource=f"infra/applications/{app}",
        idempotency_key=key,
        data_content_type="application/protobuf",
        trace_parent=_traceparent(),
    )
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    env.time.CopyFrom(now)
    env.data.Pack(payload)
    return topic, env


class BusPublisher:
    """Publishes through event-bus's Publish, retrying what is worth retrying."""

    def __init__(self, clients: ClientFactory, *, timeout: float = 5.0, attempts: int = 3) -> None:
        self._clients = clients
        self._timeout = timeout
        self._attempts = attempts
        #: Events given up on since start (also in the log).
        self.failures = 0

    async def publish(self, payload: message.Message, *, app: str, key: str) -> bool:
        """Publish; False (logged) when the bus refused it or stayed unreachable."""
        topic, env = envelope(payload, app=app, key=key)
        stub = self._clients.stub(events_pb2_grpc.EventBusServiceStub, "event-bus")
        request = events_pb2.PublishRequest(topic=topic, envelope=env)
        delay = 0.1
        for attempt in range(1, self._attempts + 1):
            try:
                await stub.Publish(request, timeout=remaining_timeout(self._timeout))
                return True
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == self._attempts:
                    self.failures += 1
                    log.warning(
                        "could not publish %s for application %s: %s %s",
                        env.type,
                        app,
                        err.code().name,
                        err.details(),
                    )
                    return False
            await asyncio.sleep(delay)  # same idempotency key: a retry is stored once
            delay *= 4
        return False
