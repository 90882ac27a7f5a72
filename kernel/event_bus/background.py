"""The bus's background work: trimming settled events, metrics, and handing the
outcome outbox to the audit relay.

Each task runs for the life of the server and is cancelled on shutdown (a
runtime closer). A failing turn is logged and retried at the next interval;
it never ends the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from autoecoops.kernel.event_bus import metrics
from autoecoops.kernel.event_bus.audit import relay_outcomes
from autoecoops.kernel.event_bus.bus import EventBus
from autoecoops.kernel.event_bus.store import redis_errors
from autoecoops.kernel.mesh.server import Runtime

log = logging.getLogger("autoecoops.event_bus")

#: Seconds between passes deleting events every group has settled (``acked`` retention).
TRIM_INTERVAL = 10.0


async def trim_settled_topics(bus: EventBus) -> int:
    """Delete settled events from the topics whose retention says ``acked``."""
    topics = [t for t in bus.registry.topics if bus.settings.retention_for(t).trim_acked]
    total = 0
    async with redis_errors():
        for topic in await bus.store.existing(topics):
            total += await bus.store.trim_settled(topic)
    return total


async def refresh_gauges(bus: EventBus) -> None:
    """Set the Prometheus gauges of every topic in use."""
    async with redis_errors():
        for topic in await bus.store.existing(list(bus.registry.topics)):
            info = await bus.store.topic_info(topic)
            if info is not None:
                metrics.observe_topic(info, bus.now_ms())


async def attach_partitions(bus: EventBus) -> None:
    """Load the partition counts (and so start draining the partitions' own
    outboxes) once, retrying while Redis is away."""
    while True:
        try:
            async with redis_errors():
                await bus.store.attach_all()
            return
        except Exception:
            log.warning("event-bus could not load the topics' partitions; retrying", exc_info=True)
            await asyncio.sleep(TRIM_INTERVAL)


async def every(interval: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``work`` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except Exception:
            log.warning("event-bus %s failed; retrying in %.0fs", what, interval, exc_info=True)


def start_background(bus: EventBus, runtime: Runtime) -> list[asyncio.Task[None]]:
    """Start the background tasks this configuration needs; stop them on shutdown."""
    tasks: list[asyncio.Task[None]] = []
    if any(bus.settings.retention_for(t).trim_acked for t in bus.registry.topics):
        tasks.append(
            asyncio.create_task(every(TRIM_INTERVAL, lambda: trim_settled_topics(bus), "trim"))
        )
    if runtime.config.metrics_port:
        tasks.append(
            asyncio.create_task(
                every(bus.settings.metrics_interval, lambda: refresh_gauges(bus), "metrics")
            )
        )
    if bus.settings.audit:
        # Outcomes go to the log through the process's audit relay, in order.
        relay_outcomes(runtime, bus.store)
    if bus.store.slot_outboxes:
        # Partitions with outboxes of their own: drain what earlier runs left there.
        tasks.append(asyncio.create_task(attach_partitions(bus)))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    if tasks:
        runtime.closers.append(stop)
    return tasks
