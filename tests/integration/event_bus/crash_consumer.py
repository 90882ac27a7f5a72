"""A consumer process for the crash test: it reports each event it receives,
then hangs in its handler until it is killed.

    python -m tests.integration.event_bus.crash_consumer ADDR TOKEN GROUP CONSUMER
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from autoecoops.events.v1 import events_pb2
from autoecoops.sdk.consumer import Consumer, Event


async def main(addr: str, token: str, group: str, name: str) -> None:
    async def handle(event: Event) -> None:
        print(f"received {event.event_id} {event.attempt}", flush=True)
        await asyncio.Event().wait()  # never finishes: killed between receive and ack

    async with grpc.aio.insecure_channel(addr) as ch:
        consumer = Consumer(
            ch,
            "infra.sync",
            group,
            handle,
            consumer=name,
            visibility_timeout=1.0,
            start_position=events_pb2.START_POSITION_EARLIEST,
            retry_policy=events_pb2.RetryPolicy(max_attempts=5),
            metadata=lambda: [("authorization", f"Bearer {token}")],
        )
        print("ready", flush=True)
        await consumer.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
