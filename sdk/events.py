"""``client.events.consume``: the event-bus consumer helper (``sdk/consumer.py``)
on the client's connection and credentials.

The helper is asyncio; ``AsyncClient.events.consume`` hands it the client's
channel. ``Client.events.consume`` runs it on an event loop of its own in
the thread that calls ``run()``, so a blocking program consumes without
writing async code (its handlers run in worker threads).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autoecoops.sdk.credentials import bearer

if TYPE_CHECKING:
    from autoecoops.sdk.consumer import Consumer, Handler
    from autoecoops.sdk.transport import AsyncTransport, SyncTransport

EVENT_BUS = "autoecoops.events.v1.EventBusService"


class AsyncEventsHelpers:
    """Helpers of ``AsyncClient.events`` beside its RPCs."""

    _transport: AsyncTransport

    def consume(self, topic: str, group: str, handler: Handler, **options: Any) -> Consumer:
        """A consumer running ``handler`` on each event of ``topic`` for ``group``.

        Return from the handler to ack, raise to nack (``PermanentError``
        dead-letters). ``await consumer.run()`` consumes until ``await
        consumer.stop()``; ``options`` are the ``Consumer``'s (``consumer=``,
        ``concurrency=``, ``visibility_timeout=``, ``retry_policy=``,
        ``start_position=``). Stop it before closing the client.
        """
        from autoecoops.sdk.consumer import Consumer

        transport = self._transport
        channel, _ = transport.channel(EVENT_BUS)

        async def metadata() -> Sequence[tuple[str, str]]:
            # Fresh per call: the consumer outlives any one token.
            headers = [(k, v) for k, v in transport.metadata if isinstance(v, str)]
            if transport.tokens is not None:
                headers.append(bearer(await transport.tokens.token()))
            return headers

        return Consumer(channel, topic, group, handler, metadata=metadata, **options)


class BlockingConsumer:
    """A consumer for the sync client: ``run()`` blocks the calling thread
    until ``stop()`` is called from another (or the bus refuses for good)."""

    def __init__(
        self,
        transport: SyncTransport,
        topic: str,
        group: str,
        handler: Handler,
        options: dict[str, Any],
    ) -> None:
        self._transport = transport
        self._args = (topic, group, handler)
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Consumer | None = None
        self._stop_grace: float | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        """Consume in this thread until ``stop()``."""
        asyncio.run(self._main())

    async def _main(self) -> None:
        from autoecoops.sdk.consumer import Consumer

        transport = self._transport
        # A channel of its own: grpc.aio cannot use the sync client's.
        channel = transport.async_channel(EVENT_BUS)

        async def metadata() -> Sequence[tuple[str, str]]:
            headers = [(k, v) for k, v in transport.metadata if isinstance(v, str)]
            if transport.tokens is not None:
                # The sync token source may call auth-service: not on this loop.
                headers.append(bearer(await asyncio.to_thread(transport.tokens.token)))
            return headers

        consumer = Consumer(channel, *self._args, metadata=metadata, **self._options)
        with self._lock:
            self._loop, self._consumer = asyncio.get_running_loop(), consumer
            grace = self._stop_grace
        try:
            if grace is None:
                await consumer.run()
        finally:
            with self._lock:
                self._loop = self._consumer = None
            await channel.close()

    def stop(self, grace: float = 30.0) -> None:
        """Stop from any thread: no new events, running handlers get ``grace`` seconds."""
        with self._lock:
            loop, consumer = self._loop, self._consumer
            if consumer is None or loop is None:
                # Not running: a run() that starts later returns at once.
                self._stop_grace = grace
                return
            asyncio.run_coroutine_threadsafe(consumer.stop(grace), loop)


class EventsHelpers:
    """Helpers of ``Client.events`` beside its RPCs."""

    _transport: SyncTransport

    def consume(self, topic: str, group: str, handler: Handler, **options: Any) -> BlockingConsumer:
        """A consumer running ``handler`` on each event of ``topic`` for ``group``:
        ``consumer.run()`` blocks until ``consumer.stop()`` (from another thread).

        Return from the handler to ack, raise to nack (``PermanentError``
        dead-letters); handlers run in worker threads. ``options`` are the
        ``Consumer``'s (``consumer=``, ``concurrency=``, ``visibility_timeout=``,
        ``retry_policy=``, ``start_position=``).
        """
        return BlockingConsumer(self._transport, topic, group, handler, options)
