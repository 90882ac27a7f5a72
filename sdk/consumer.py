"""Consume events from the event bus: write a handler, the helper does the rest.

    async def handle(event: Event) -> None:
        sync = event.data            # the payload, unpacked (e.g. infra.v1.SyncStarted)
        await apply(sync)            # return: acked; raise: nacked with the error as reason

    consumer = Consumer(channel, "infra.sync", "deployer", handle, concurrency=4,
                        metadata=lambda: [("authorization", f"Bearer {token}")])
    await consumer.run()             # until consumer.stop() (or a non-retryable error)

What it handles for you:
- concurrency: up to ``concurrency`` handlers run at once, and the bus never
  sends more than that, so no event waits in a client buffer while its lease
  runs; ``concurrency=1`` processes one at a time, in order;
- keep-alive: the leases of running handlers are extended before they lapse,
  so a long handler is not redelivered to another consumer meanwhile;
- acks are batched; a handler's exception becomes a Nack whose reason is the
  exception; raise ``PermanentError`` to dead-letter at once;
- reconnects with backoff when the bus is unavailable, and a graceful stop:
  no new events, running handlers get a grace period, then the rest is nacked.

Synchronous handlers run in a worker thread, so they do not block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, duration, message, message_factory

from autoecoops.events.v1 import envelope_pb2, events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.backoff import Backoff, exponential_delay
from autoecoops.kernel.mesh.errors import from_rpc_error

log = logging.getLogger("autoecoops.sdk.consumer")

#: Supplies the metadata of each call (e.g. a fresh bearer token); sync or async.
MetadataProvider = Callable[[], Sequence[tuple[str, str]] | Awaitable[Sequence[tuple[str, str]]]]
#: The user's handler: return to ack, raise to nack.
Handler = Callable[["Event"], Awaitable[object] | object]

#: Codes after which the subscription is simply opened again.
_RECONNECT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
MAX_REASON = 1000


class PermanentError(Exception):
    """Raised by a handler for an event that can never succeed: dead-letter it now."""


@dataclass(frozen=True, slots=True)
class Event:
    """One delivery handed to a handler."""

    #: Settles this delivery (the helper does it for you).
    delivery_id: str
    #: The event's id.
    event_id: str
    #: The whole envelope: type, source, subject, actor, trace context...
    envelope: envelope_pb2.Envelope
    #: The payload unpacked to its message type; None if the type is not installed.
    data: message.Message | None
    #: Which delivery of this event this is, from 1.
    attempt: int

    @property
    def type(self) -> str:
        """The CloudEvents type, e.g. ``autoecoops.infra.sync.started``."""
        return self.envelope.type


def unpack(any_type_url: str, value: bytes) -> message.Message | None:
    """The payload as its generated message, importing its package's events if needed."""
    name = any_type_url.rpartition("/")[2]
    pool = descriptor_pool.Default()
    try:
        desc = pool.FindMessageTypeByName(name)
    except KeyError:
        package = name.rpartition(".")[0]
        try:
            importlib.import_module(f"{package}.events_pb2")
            desc = pool.FindMessageTypeByName(name)
        except (ImportError, KeyError):
            return None
    msg = message_factory.GetMessageClass(desc)()
    msg.ParseFromString(value)
    return msg


class Consumer:
    """A member of a consumer group, running ``handler`` for each event."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        topic: str,
        group: str,
        handler: Handler,
        *,
        consumer: str = "",
        concurrency: int = 1,
        visibility_timeout: float = 30.0,
        retry_policy: events_pb2.RetryPolicy | None = None,
        start_position: int = events_pb2.START_POSITION_LATEST,
        metadata: MetadataProvider | None = None,
        max_reconnect_backoff: float = 30.0,
        ack_delay: float = 0.005,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.stub = events_pb2_grpc.EventBusServiceStub(channel)
        self.topic, self.group, self.handler = topic, group, handler
        #: Stable across restarts is best: a restarted consumer of the same name
        #: is the one whose unsettled deliveries are due back first.
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.retry_policy = retry_policy
        self.start_position = start_position
        self._metadata = metadata
        self._max_backoff = max_reconnect_backoff
        #: How long an ack may wait for others to share its Ack call.
        self._ack_delay = ack_delay
        self._stopping = asyncio.Event()
        self._call: Any = None
        self._handlers: dict[str, asyncio.Task[None]] = {}
        self._acks: list[str] = []
        self._ack_ready = asyncio.Event()
        self._closing = False
        self._room = asyncio.Semaphore(concurrency)
        self._background: list[asyncio.Task[None]] = []

    async def _meta(self) -> Sequence[tuple[str, str]] | None:
        if self._metadata is None:
            return None
        got = self._metadata()
        if inspect.isawaitable(got):
            got = await got
        return list(got)

    def _request(self) -> events_pb2.SubscribeRequest:
        req = events_pb2.SubscribeRequest(
            topic=self.topic,
            group=self.group,
            consumer=self.consumer,
            max_in_flight=self.concurrency,
            max_batch_size=self.concurrency,
            visibility_timeout=duration.from_nanoseconds(int(self.visibility_timeout * 1e9)),
            start_position=self.start_position,  # type: ignore[arg-type]
        )
        if self.retry_policy is not None:
            req.retry_policy.CopyFrom(self.retry_policy)
        return req

    async def run(self) -> None:
        """Consume until ``stop()``; raises the bus's error if it is not retryable
        (a bad request, no permission)."""
        self._background = [
            asyncio.create_task(self._ack_loop()),
            asyncio.create_task(self._keepalive_loop()),
        ]
        backoff = Backoff(0.1, self._max_backoff)
        try:
            while not self._stopping.is_set():
                try:
                    await self._subscribe_once()
                    backoff.reset()
                except asyncio.CancelledError:
                    # stop() cancels the call; a cancellation of this task itself goes on.
                    task = asyncio.current_task()
                    if not self._stopping.is_set() or (task is not None and task.cancelling()):
                        raise
                    break
                except grpc.aio.AioRpcError as err:
                    if self._stopping.is_set():
                        break
                    if err.code() not in _RECONNECT:
                        raise from_rpc_error(err) from err
                    log.warning("event stream ended (%s); reconnecting", err.code().name)
                if self._stopping.is_set():
                    break
                # Jittered, so a restarted bus is not hit by every consumer at once.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next() * (0.5 + random.random())):
                        await self._stopping.wait()
        finally:
            await self._drain()

    async def _subscribe_once(self) -> None:
        self._call = self.stub.Subscribe(self._request(), metadata=await self._meta())
        try:
            async for reply in self._call:
                for d in reply.deliveries or [reply.delivery]:
                    await self._room.acquire()
                    self._handlers[d.delivery_id] = asyncio.create_task(self._handle(d))
        finally:
            self._call = None

    async def _handle(self, d: events_pb2.Delivery) -> None:
        try:
            event = Event(
                delivery_id=d.delivery_id,
                event_id=d.event_id,
                envelope=d.envelope,
                data=unpack(d.envelope.data.type_url, d.envelope.data.value),
                attempt=d.attempt,
            )
            if inspect.iscoroutinefunction(self.handler):
                await self.handler(event)
            else:
                result = await asyncio.to_thread(self.handler, event)
                if inspect.isawaitable(result):
                    await result
        except asyncio.CancelledError:
            # Stopped past the grace period: hand the event back right away.
            await self._nack(d.delivery_id, "consumer stopped before finishing", False)
            raise
        except PermanentError as err:
            await self._nack(d.delivery_id, _reason(err), True)
        except Exception as err:
            await self._nack(d.delivery_id, _reason(err), False)
        else:
            self._acks.append(d.delivery_id)
            self._ack_ready.set()
        finally:
            self._handlers.pop(d.delivery_id, None)
            self._room.release()

    async def _nack(self, delivery_id: str, reason: str, dead_letter: bool) -> None:
        try:
            await self.stub.Nack(
                events_pb2.NackRequest(
                    delivery_id=delivery_id, reason=reason, dead_letter=dead_letter
                ),
                metadata=await self._meta(),
                timeout=10,
            )
        except grpc.aio.AioRpcError as err:
            # The lease runs out and the bus redelivers: nothing is lost.
            log.warning(
                "nack failed (%s): the event comes back when its lease expires", err.code().name
            )

    async def _ack_loop(self) -> None:
        """Send acks in batches: whatever finished while the last Ack was in flight.
        Ends once closing and every ack is sent."""
        while not (self._closing and not self._acks):
            await self._ack_ready.wait()
            if self._ack_delay and not self._closing and len(self._acks) < self.concurrency:
                # A moment for the other handlers of the batch to finish: one
                # Ack call (and one audit entry) for many events.
                await asyncio.sleep(self._ack_delay)
            self._ack_ready.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        batch, self._acks = self._acks, []
        if not batch:
            return
        for attempt in range(5):
            try:
                reply = await self.stub.Ack(
                    events_pb2.AckRequest(delivery_ids=batch),
                    metadata=await self._meta(),
                    timeout=10,
                )
                if reply.expired_delivery_ids:
                    log.warning(
                        "%d event(s) finished after their lease expired; they are redelivered",
                        len(reply.expired_delivery_ids),
                    )
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RECONNECT or attempt == 4:
                    log.warning("ack failed (%s): %s", err.code().name, from_rpc_error(err))
                    return
                await asyncio.sleep(exponential_delay(attempt + 1, 0.1))

    async def _keepalive_loop(self) -> None:
        """Extend the leases of running handlers well before they lapse."""
        interval = max(self.visibility_timeout / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            running = list(self._handlers)
            if not running:
                continue
            try:
                reply = await self.stub.ExtendLease(
                    events_pb2.ExtendLeaseRequest(delivery_ids=running),
                    metadata=await self._meta(),
                    timeout=max(interval, 1.0),
                )
                if reply.expired_delivery_ids:
                    log.warning(
                        "%d lease(s) lapsed while handling", len(reply.expired_delivery_ids)
                    )
            except grpc.aio.AioRpcError as err:
                log.warning("keep-alive failed (%s); retrying", err.code().name)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking events; give running handlers ``grace`` seconds, then nack the rest."""
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        running = list(self._handlers.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)

    async def _drain(self) -> None:
        """Settle what is left and stop the helper tasks."""
        if self._handlers:
            await asyncio.wait(list(self._handlers.values()))
        acker, keepalive = self._background
        # The acker finishes the Ack in flight and sends the rest, then ends.
        self._closing = True
        self._ack_ready.set()
        await acker
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text[:MAX_REASON]


__all__ = ["Consumer", "Event", "Handler", "MetadataProvider", "PermanentError"]
