"""event-bus's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import duration_pb2, timestamp, timestamp_pb2

from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.event_bus.background import start_background
from autoecoops.kernel.event_bus.bus import DeadLetterSelector, EventBus
from autoecoops.kernel.event_bus.envelope import PublishContext
from autoecoops.kernel.event_bus.names import MAX_U64, check_name
from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.event_bus.settings import EventBusSettings
from autoecoops.kernel.event_bus.store import (
    DeadLetterRecord,
    EventStore,
    TopicInfo,
)
from autoecoops.kernel.event_bus.subscription import Delivery, Subscription, SubscriptionLoop
from autoecoops.kernel.mesh.audit import outbox_for
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.errors import ConfigError, FieldViolation, InvalidArgument
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Runtime

#: Shortest lease a subscriber may ask for, and the longest.
MIN_VISIBILITY = 0.1
MAX_VISIBILITY = 12 * 3600.0


def _subject() -> str:
    p = current_principal.get()
    return p.subject if p is not None else ""


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return max(ts.ToMilliseconds(), 0)


def _envelope(data: bytes, event_id: str) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope.FromString(data)
    env.id = event_id
    return env


def _delivery(d: Delivery) -> events_pb2.Delivery:
    return events_pb2.Delivery(
        delivery_id=d.delivery_id,
        event_id=d.event_id,
        envelope=_envelope(d.envelope, d.event_id),
        attempt=d.attempt,
        lease_expire_time=timestamp.from_nanoseconds(int(d.lease_expire_at * 1e9)),
        partition=d.partition,
    )


def _dead_letter(topic: str, d: DeadLetterRecord) -> events_pb2.DeadLetter:
    return events_pb2.DeadLetter(
        dead_letter_id=d.id,
        topic=topic,
        group=d.group,
        envelope=_envelope(d.envelope, d.event_id),
        reason=d.reason,
        attempts=d.attempts,
        consumer=d.consumer,
        dead_letter_time=timestamp.from_milliseconds(d.time_ms),
        partition=d.partition,
    )


def _selector(
    msg: events_pb2.RedriveDeadLettersRequest | events_pb2.PurgeDeadLettersRequest,
) -> DeadLetterSelector:
    which = msg.WhichOneof("selector")
    if which == "ids" and msg.ids.ids:
        return DeadLetterSelector(ids=list(msg.ids.ids))
    if which == "filter":
        f = msg.filter
        start = f.start_time.ToMilliseconds() if f.HasField("start_time") else None
        end = f.end_time.ToMilliseconds() if f.HasField("end_time") else None
        if start is not None and end is not None and end < start:
            raise InvalidArgument(
                "filter: end_time is before start_time",
                reason="INVALID_TIME_RANGE",
                field_violations=[
                    FieldViolation("filter.end_time", "must not be before filter.start_time")
                ],
            )
        # Times before the epoch select nothing (no dead letter is that old);
        # an end at or before the epoch or the start is an empty range, not an error.
        return DeadLetterSelector(
            group=f.group,
            event_type=f.event_type,
            start_ms=None if start is None else max(start, 0),
            end_ms=None if end is None else max(end, 0),
        )
    if which == "all" and msg.all:
        return DeadLetterSelector(all=True)
    raise InvalidArgument(
        "selector: set ids (non-empty), filter, or all=true",
        reason="SELECTOR_MISSING",
        field_violations=[FieldViolation("selector", "one of ids, filter or all is required")],
    )


def _stats(info: TopicInfo, now_ms: int) -> events_pb2.TopicStats:
    stats = events_pb2.TopicStats(
        topic=info.name,
        length=info.length,
        dead_letter_count=info.dead_letters,
        partitions=info.partitions,
    )
    for g in info.groups:
        age = duration_pb2.Duration()
        if g.oldest_pending_ms is not None:
            age.FromMilliseconds(max(now_ms - g.oldest_pending_ms, 0))
        c = g.counters
        stats.groups.append(
            events_pb2.ConsumerGroupStats(
                group=g.name,
                consumer_count=g.consumers,
                lag=g.lag,
                pending=g.pending,
                oldest_pending_age=age,
                dead_letter_count=g.dead_letters,
                delivered_count=c.get("delivered", 0),
                acked_count=c.get("acked", 0),
                retried_count=c.get("retried", 0),
                dead_lettered_count=c.get("dead_lettered", 0),
            )
        )
    return stats


class EventBusServicer(events_pb2_grpc.EventBusServiceServicer):
    """Serves autoecoops.events.v1.EventBusService."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def Publish(
        self, request: events_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.PublishResponse:
        """Publish one event."""
        ctx = PublishContext.current(current_principal.get())
        (r,) = await self.bus.publish(request.topic, [request.envelope], ctx, batch=False)
        return events_pb2.PublishResponse(
            event_id=r.event_id, duplicate=r.duplicate, partition=r.partition
        )

    async def PublishBatch(
        self, request: events_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.PublishBatchResponse:
        """Publish several events to one topic, all or none."""
        ctx = PublishContext.current(current_principal.get())
        results = await self.bus.publish(request.topic, list(request.envelopes), ctx)
        return events_pb2.PublishBatchResponse(
            results=[
                events_pb2.PublishResult(
                    event_id=r.event_id, duplicate=r.duplicate, partition=r.partition
                )
                for r in results
            ]
        )

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.SubscribeResponse]:
        """Stream deliveries to one consumer of a group (in batches if asked)."""
        if request.max_batch_size < 0:
            raise InvalidArgument(
                "max_batch_size: must not be negative",
                reason="INVALID_SUBSCRIPTION",
                field_violations=[FieldViolation("max_batch_size", "negative")],
            )
        loop = SubscriptionLoop(self.bus, self._subscription(request))
        await loop.setup()
        size = request.max_batch_size
        async for batch in loop.deliveries():
            protos = [_delivery(d) for d in batch]
            if size > 1:
                for at in range(0, len(protos), size):
                    yield events_pb2.SubscribeResponse(deliveries=protos[at : at + size])
            else:
                for d in protos:
                    yield events_pb2.SubscribeResponse(delivery=d)

    def _subscription(self, request: events_pb2.SubscribeRequest) -> Subscription:
        settings = self.bus.settings
        self.bus.registry.check_topic(request.topic)
        check_name(request.group, "group", "consumer group")
        check_name(request.consumer, "consumer", "consumer")
        bad: list[FieldViolation] = []
        limit = settings.max_in_flight_limit
        if not 0 <= request.max_in_flight <= limit:
            bad.append(FieldViolation("max_in_flight", f"must be 1 to {limit} (0: default)"))
        vis = None
        if request.HasField("visibility_timeout"):
            vis = request.visibility_timeout.ToNanoseconds() / 1e9
            if not MIN_VISIBILITY <= vis <= MAX_VISIBILITY:
                bad.append(FieldViolation("visibility_timeout", "must be 100ms to 12h"))
        if bad:
            raise InvalidArgument(
                "invalid subscription: " + "; ".join(f"{v.field} {v.description}" for v in bad),
                reason="INVALID_SUBSCRIPTION",
                field_violations=bad,
            )
        policy = (
            RetryPolicy.from_proto(request.retry_policy)
            if request.HasField("retry_policy")
            else None
        )
        return Subscription(
            topic=request.topic,
            group=request.group,
            consumer=request.consumer,
            subject=_subject(),
            max_in_flight=request.max_in_flight or settings.max_in_flight,
            visibility_timeout=vis,
            retry_policy=policy,
            start="0" if request.start_position == events_pb2.START_POSITION_EARLIEST else "$",
        )

    async def Ack(
        self, request: events_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.AckResponse:
        """Acknowledge deliveries."""
        out = await self.bus.ack(list(request.delivery_ids), _subject())
        return events_pb2.AckResponse(acked_count=out.acked, expired_delivery_ids=out.expired)

    async def Nack(
        self, request: events_pb2.NackRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.NackResponse:
        """Reject a delivery: retry after backoff, or dead-letter."""
        out = await self.bus.nack(
            request.delivery_id,
            _subject(),
            request.reason,
            delay=request.delay.ToNanoseconds() / 1e9 if request.HasField("delay") else None,
            dead_letter=request.dead_letter,
        )
        reply = events_pb2.NackResponse(dead_lettered=out.dead_lettered)
        if out.redeliver_at is not None:
            reply.redeliver_time.CopyFrom(timestamp.from_nanoseconds(int(out.redeliver_at * 1e9)))
        return reply

    async def ExtendLease(
        self, request: events_pb2.ExtendLeaseRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ExtendLeaseResponse:
        """Keep deliveries leased while they are worked on."""
        ext = request.extension.ToNanoseconds() / 1e9 if request.HasField("extension") else None
        leases, expired = await self.bus.extend(list(request.delivery_ids), _subject(), ext)
        return events_pb2.ExtendLeaseResponse(
            leases=[
                events_pb2.Lease(
                    delivery_id=lease.delivery_id,
                    lease_expire_time=timestamp.from_nanoseconds(int(lease.expire_at * 1e9)),
                )
                for lease in leases
            ],
            expired_delivery_ids=expired,
        )

    async def ListDeadLetters(
        self, request: events_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListDeadLettersResponse:
        """A page of a topic's dead letters."""
        items, token = await self.bus.list_dead_letters(
            request.topic, request.group, request.page_size, request.page_token
        )
        return events_pb2.ListDeadLettersResponse(
            dead_letters=[_dead_letter(request.topic, d) for d in items], next_page_token=token
        )

    async def GetDeadLetter(
        self, request: events_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.GetDeadLetterResponse:
        """One dead letter."""
        d = await self.bus.get_dead_letter(request.topic, request.dead_letter_id)
        return events_pb2.GetDeadLetterResponse(dead_letter=_dead_letter(request.topic, d))

    async def RedriveDeadLetters(
        self, request: events_pb2.RedriveDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.RedriveDeadLettersResponse:
        """Send dead letters back for delivery."""
        n = await self.bus.redrive(request.topic, _selector(request))
        return events_pb2.RedriveDeadLettersResponse(redriven_count=n)

    async def PurgeDeadLetters(
        self, request: events_pb2.PurgeDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.PurgeDeadLettersResponse:
        """Delete dead letters."""
        n = await self.bus.purge(request.topic, _selector(request))
        return events_pb2.PurgeDeadLettersResponse(purged_count=n)

    async def Replay(
        self, request: events_pb2.ReplayRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ReplayResponse:
        """Deliver past events to a group again."""
        start = request.WhichOneof("start")
        if start is None:
            raise InvalidArgument(
                "start: set start_time or start_event_id",
                reason="INVALID_REPLAY",
                field_violations=[FieldViolation("start", "required")],
            )
        start_id = (
            f"{_ms(request.start_time)}-0" if start == "start_time" else request.start_event_id
        )
        end = request.WhichOneof("end")
        end_id = None
        if end == "end_time":
            end_id = f"{_ms(request.end_time)}-{MAX_U64}"
        elif end == "end_event_id":
            end_id = request.end_event_id
        n = await self.bus.replay(
            request.topic,
            request.group,
            start_id,
            end_id,
            request.reset,
            partition=request.partition if request.HasField("partition") else None,
            by_id=start == "start_event_id" or end == "end_event_id",
        )
        return events_pb2.ReplayResponse(event_count=n)

    async def GetTopicStats(
        self, request: events_pb2.GetTopicStatsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.GetTopicStatsResponse:
        """A topic's length and its groups' progress and counters."""
        info = await self.bus.topic_stats(request.topic, request.group)
        return events_pb2.GetTopicStatsResponse(stats=_stats(info, self.bus.now_ms()))

    async def CreateTopic(
        self, request: events_pb2.CreateTopicRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.CreateTopicResponse:
        """Fix a topic's partition count before it is used."""
        n = await self.bus.create_topic(request.topic_id, request.topic.partitions)
        return events_pb2.CreateTopicResponse(
            topic=events_pb2.Topic(name=request.topic_id, partitions=n)
        )

    async def ListTopics(
        self, request: events_pb2.ListTopicsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListTopicsResponse:
        """Topics that have had events published to them."""
        infos, token = await self.bus.list_topics(request.page_size, request.page_token)
        topics = []
        for i in infos:
            t = events_pb2.Topic(
                name=i.name,
                length=i.length,
                groups=[g.name for g in i.groups],
                partitions=i.partitions,
            )
            if i.last_id:
                t.last_event_time.CopyFrom(
                    timestamp.from_milliseconds(int(i.last_id.split("-")[0]))
                )
            topics.append(t)
        return events_pb2.ListTopicsResponse(topics=topics, next_page_token=token)


def build_bus(runtime: Runtime, settings: EventBusSettings | None = None) -> EventBus:
    """The bus of a runtime: its Redis, under ``<prefix>events:``."""
    settings = settings or EventBusSettings.from_env()
    if not runtime.config.redis_url:
        raise ConfigError("REDIS_URL: event-bus needs Redis")
    # Its own pool: subscriptions hold connections in blocking reads.
    client = connect(runtime.config.redis_url)
    runtime.closers.insert(0, client.aclose)
    outbox = outbox_for(runtime, "event-bus")
    config = runtime.config
    store = EventStore(
        client,
        runtime.key("events") + ":",
        settings,
        outbox,
        wait_replicas=config.wait_replicas,
        wait_timeout_ms=config.redis_wait_timeout_ms,
    )
    return EventBus(store, settings)


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add event-bus's servicers to ``server`` and start its background work."""
    bus = build_bus(runtime)
    events_pb2_grpc.add_EventBusServiceServicer_to_server(EventBusServicer(bus), server)
    start_background(bus, runtime)
    return [events_pb2.DESCRIPTOR.services_by_name["EventBusService"].full_name]
