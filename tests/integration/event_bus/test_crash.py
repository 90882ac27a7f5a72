"""At-least-once with a crash: a consumer process is SIGKILLed between receiving
an event and acking it, and the event is redelivered to another consumer."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.redis import connect
from autoecoops.sdk.consumer import Consumer, Event
from tests.conftest import MintToken, StartMesh, make_config
from tests.integration.event_bus.conftest import TOPIC, delete_prefix, sync_started

ROOT = Path(__file__).resolve().parents[3]


async def read_line(proc: asyncio.subprocess.Process, within: float = 30) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), within)
    assert line, f"consumer process exited ({proc.returncode})"
    return line.decode().strip()


async def test_a_killed_consumers_event_is_redelivered_to_another(
    start_mesh: StartMesh,
    mint_token: MintToken,
    bus_redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_POLL_SECONDS", "0.05")
    cfg = make_config(
        data_dir=tmp_path, shutdown_grace=1.0, redis_url=bus_redis_url, key_prefix=key_prefix
    )
    mesh = await start_mesh(["auth-service", "policy-audit", "event-bus"], config=cfg, secure=True)
    token = mint_token("worker", ["admin"])
    md = [("authorization", f"Bearer {token}")]
    addr = mesh.config.addr("event-bus")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.event_bus.crash_consumer",
        addr,
        token,
        "g",
        "doomed",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert await read_line(proc) == "ready"
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = events_pb2_grpc.EventBusServiceStub(ch)
            published = await stub.Publish(
                events_pb2.PublishRequest(topic=TOPIC, envelope=sync_started("web", "k1")),
                metadata=md,
            )
            assert await read_line(proc) == f"received {published.event_id} 1"
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)

            got: list[tuple[str, int]] = []
            done = asyncio.Event()

            async def survivor(event: Event) -> None:
                got.append((event.event_id, event.attempt))
                done.set()

            consumer = Consumer(
                ch,
                TOPIC,
                "g",
                survivor,
                consumer="survivor",
                visibility_timeout=1.0,
                retry_policy=events_pb2.RetryPolicy(
                    initial_backoff=duration_pb2.Duration(nanos=100_000_000), max_attempts=5
                ),
                metadata=lambda: md,
            )
            task = asyncio.create_task(consumer.run())
            await asyncio.wait_for(done.wait(), 30)
            await consumer.stop(5)
            await asyncio.wait_for(task, 10)
            assert got == [(published.event_id, 2)]
            stats = await stub.GetTopicStats(
                events_pb2.GetTopicStatsRequest(topic=TOPIC, group="g"), metadata=md
            )
            (g,) = stats.stats.groups
            assert (g.acked_count, g.pending, g.delivered_count) == (1, 0, 2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        client = connect(bus_redis_url)
        await delete_prefix(client, key_prefix)
        await client.aclose()
