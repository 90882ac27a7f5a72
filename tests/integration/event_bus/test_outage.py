"""A Redis outage: the test runs its own redis-server (append-only file on),
kills it with SIGKILL and starts it again on the same data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autoecoops.kernel.event_bus.retry import RetryPolicy
from autoecoops.kernel.mesh.errors import Unavailable
from autoecoops.kernel.mesh.redis import connect
from tests.conftest import REDIS_SERVER, RedisProcess
from tests.integration.event_bus.conftest import TOPIC, Harness, make_bus, sync_started

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs the redis-server binary")


@pytest.fixture
async def redis_process(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    await server.start()
    yield server
    if server.proc is not None and server.proc.returncode is None:
        await server.kill()


async def test_a_redis_outage_fails_publishes_loses_nothing_and_recovers(
    redis_process: RedisProcess,
) -> None:
    client = connect(redis_process.url)
    bus = Harness(make_bus(client, "outage:", visibility_timeout=1.0), client)
    try:
        before = await bus.publish_apps(*"abcde")
        s = await bus.subscribe(max_in_flight=10, policy=RetryPolicy(0.05, 2, 0.2, 10))
        got = await s.take(5)
        await bus.ack(*got[:2])

        await redis_process.kill()
        with pytest.raises(Unavailable) as err:
            await bus.publish_apps("during")
        assert err.value.reason == "REDIS_UNAVAILABLE"
        with pytest.raises(Unavailable):
            await bus.bus.ack([got[2].delivery_id], "alice")

        await redis_process.start()
        # Connections pooled before the outage are replaced on their next use.
        after = await bus.publish_apps("after")
        # The subscription carries on by itself: the three unacked events come
        # back once their leases lapse, and new events flow.
        back = await s.take(4, within=30)
        assert sorted(d.event_id for d in back) == sorted(before[2:] + after)
        await bus.ack(*back)
        stream = bus.store.keys(TOPIC).stream
        kept = [i.decode() for i, _ in await client.xrange(stream)]
        assert kept == before + after  # every event acknowledged to its producer survived

        # Redis loses the group (e.g. restored from an older snapshot): the
        # subscription recreates it, and the group's dedup marks keep what it
        # had processed from coming back.
        await client.xgroup_destroy(stream, "g")
        (newest,) = await bus.publish([sync_started("newest", "key-newest")])
        (d,) = await s.take(1, within=30)
        assert d.event_id == newest
        await bus.ack(d)
        await s.nothing_for(0.5)
        assert await bus.store.group_exists(TOPIC, "g")
    finally:
        for stream_ in bus.streams:
            await stream_.close()
        await client.aclose()
