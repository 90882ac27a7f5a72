"""Event triggers: runbooks started by events on the bus.

For every topic some runbook's ``trigger.event`` names, the platform follows
the topic as the consumer group ``autoops-runbooks`` (so replicas share the
work and every event is handled once), starts the runbooks whose event type
matches, and acks. Delivery is at least once, so the start is keyed by
(runbook, event id): a redelivered event does not start a second remediation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import grpc

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.backoff import Backoff
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.platforms.autoops.remediation import Remediator, in_trace
from autoecoops.platforms.autoops.store import AutoOpsStore

log = logging.getLogger("autoecoops.autoops")
GROUP = "autoops-runbooks"


class EventTriggers:
    """Follows the topics event-triggered runbooks name."""

    def __init__(self, clients: ClientFactory, store: AutoOpsStore, remediator: Remediator) -> None:
        self._clients = clients
        self._store = store
        self._remediator = remediator
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._consumer = f"autoops-{socket.gethostname()}-{os.getpid()}"

    async def refresh(self) -> None:
        """Follow exactly the topics that runbooks' event triggers name."""
        topics = {
            rb.trigger.event.topic
            for rb in await self._store.all("runbooks", pb.Runbook)
            if rb.trigger.WhichOneof("kind") == "event"
        }
        for topic in set(self._tasks) - topics:
            self._tasks.pop(topic).cancel()
        for topic in topics - set(self._tasks):
            self._tasks[topic] = asyncio.get_running_loop().create_task(
                self._follow(topic), name=f"autoops follows {topic}"
            )

    async def close(self) -> None:
        """Stop following."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _follow(self, topic: str) -> None:
        stub = self._clients.stub(events_pb2_grpc.EventBusServiceStub, "event-bus")
        backoff = Backoff(0.5, 30.0)
        while True:
            # The stream carries the platform's token itself: grpc.aio files an
            # interceptor under the first call kind it implements (an elif
            # chain in aio/_channel.py), so the client factory's credentials
            # and deadline interceptors never see server-streaming calls.
            source = self._clients.token_source
            token = await source.token() if source is not None else ""
            md = [("authorization", f"Bearer {token}")] if token else None
            call = stub.Subscribe(
                events_pb2.SubscribeRequest(
                    topic=topic,
                    group=GROUP,
                    consumer=self._consumer,
                    start_position=events_pb2.START_POSITION_LATEST,
                ),
                metadata=md,
            )
            try:
                async for reply in call:
                    backoff.reset()
                    deliveries = list(reply.deliveries) or (
                        [reply.delivery] if reply.HasField("delivery") else []
                    )
                    for d in deliveries:
                        await self.handle(topic, d.envelope)
                    if deliveries:
                        await stub.Ack(
                            events_pb2.AckRequest(delivery_ids=[d.delivery_id for d in deliveries])
                        )
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "following %s for runbooks: %s %s", topic, err.code().name, err.details()
                )
            except Exception:
                log.exception("following %s for runbooks failed", topic)
            await asyncio.sleep(backoff.next())

    async def handle(self, topic: str, env: envelope_pb2.Envelope) -> list[pb.Remediation]:
        """Start every runbook whose event trigger matches ``env`` (once per event)."""
        started = []
        for rb in await self._store.all("runbooks", pb.Runbook):
            trig = rb.trigger
            if trig.WhichOneof("kind") != "event":
                continue
            if trig.event.topic != topic or trig.event.event_type != env.type:
                continue

            async def run(rb: pb.Runbook = rb) -> pb.Remediation:
                # The remediation continues the producer's trace.
                with in_trace(_trace_of(env.trace_parent)):
                    return await self._remediator.start(
                        rb,
                        reason=f"event {env.type} about {env.subject or env.resource or env.id}",
                        target=rb.target or env.subject,
                        event_id=env.id,
                    )

            started.append(
                await self._store.once(
                    "EventTrigger", f"{rb.name}/{env.id}", env.id.encode(), run, pb.Remediation
                )
            )
        return started


def _trace_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent ('' when malformed)."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return ""
        return parts[1]
    return ""
