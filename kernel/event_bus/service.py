"""event-bus's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime


class EventBusServicer(events_pb2_grpc.EventBusServiceServicer):
    """Serves autoecoops.events.v1.EventBusService."""

    PENDING = "Redis Streams routing, delivery, retries and the dead-letter queue land with the event-bus issue"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add event-bus's servicers to ``server``."""
    events_pb2_grpc.add_EventBusServiceServicer_to_server(EventBusServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [events_pb2.DESCRIPTOR.services_by_name["EventBusService"].full_name]
