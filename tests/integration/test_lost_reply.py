"""A write whose reply Redis never sent: Redis ran it (a stop, a cut network)
and the connection broke before the answer came back.

The client must not be told a plain failure, since the change may be made:
the answer is UNAVAILABLE / REDIS_UNAVAILABLE with ``committed: "unknown"``,
and a retry with the same idempotency key finds the change
(docs/policy-audit.md, "The audit rule"). The proxy below makes that moment
happen on purpose; Redis itself is the shared one, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.exceptions as rx
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect, connect_sync, is_cluster_url, maybe_ran
from tests.conftest import MintToken, StartMesh, free_port, make_config, topic_stream
from tests.integration.event_bus.conftest import TOPIC, sync_started


class ReplyEater:
    """A TCP proxy in front of one Redis. Once ``arm``-ed with a marker, it
    forwards the client's bytes that hold the marker, lets Redis run them,
    then closes that connection without the reply and refuses every new
    connection until ``restore``: to the client, Redis stopped as it ran the
    command."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.marker = b""
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def arm(self, marker: bytes) -> None:
        self.marker = marker
        self.cut.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        eaten = False

        async def down() -> None:
            while data := await up_reader.read(65536):
                if eaten:
                    continue  # the reply to the marked command: dropped
                writer.write(data)
                await writer.drain()

        async def up() -> None:
            nonlocal eaten
            while data := await reader.read(65536):
                if self.marker and self.marker in data:
                    eaten, self.marker = True, b""
                    if self._server is not None:
                        self._server.close()  # new connections are refused from now on
                    up_writer.write(data)
                    await up_writer.drain()
                    await asyncio.sleep(0.2)  # Redis runs it; its reply is dropped
                    self.cut.set()
                    return
                up_writer.write(data)
                await up_writer.drain()

        try:
            tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)


@pytest.fixture
async def eater(redis_url: str) -> AsyncIterator[ReplyEater]:
    if is_cluster_url(redis_url):
        pytest.skip("the proxy stands in front of one Redis, not a cluster")
    port = connect_sync(redis_url).connection_pool.connection_kwargs.get("port")
    if not isinstance(port, int):
        pytest.skip("the proxy needs Redis on TCP")
    proxy = ReplyEater(port)
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_a_retried_command_whose_first_try_may_have_run_says_so(
    eater: ReplyEater, redis_url: str, key_prefix: str
) -> None:
    """The client's one retry meets a refused connection; the error raised is
    the first try's (which Redis ran), not the refusal (which says nothing was sent)."""
    key = f"{key_prefix}lost-reply"
    client = connect(eater.url)
    try:
        await client.ping()  # a pooled connection, as a running service has
        eater.arm(key.encode())
        with pytest.raises(rx.ConnectionError) as caught:
            await client.set(key, "ran")
        assert maybe_ran(caught.value), caught.value
        assert connect_sync(redis_url).get(key) == b"ran"  # Redis did run it
        # A connection never made is certain: nothing was sent.
        with pytest.raises(rx.ConnectionError) as refused:
            await client.set(key, "never")
        assert not maybe_ran(refused.value), refused.value
        assert connect_sync(redis_url).get(key) == b"ran"
    finally:
        await client.aclose()
        connect_sync(redis_url).delete(key)


def _info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(err.trailing_metadata() or ()).get(STATUS_DETAILS_KEY)
    assert raw, err
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status_pb2.Status.FromString(raw).details), err
    return info


async def test_a_publish_whose_reply_was_lost_answers_committed_unknown(
    eater: ReplyEater,
    start_mesh: StartMesh,
    mint_token: MintToken,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    cfg = make_config(
        data_dir=tmp_path, shutdown_grace=0.5, redis_url=redis_url, key_prefix=key_prefix
    )
    # auth-service and the log on Redis itself; event-bus behind the proxy.
    await start_mesh(["auth-service", "policy-audit"], config=cfg, secure=True)
    await start_mesh(
        ["event-bus"], config=dataclasses.replace(cfg, redis_url=eater.url), secure=True
    )
    md = [("authorization", f"Bearer {mint_token('root', ['admin'])}")]
    key = f"lost-{uuid.uuid4().hex}"
    env = sync_started("web", key)
    request = events_pb2.PublishRequest(topic=TOPIC, envelope=env)
    async with (
        grpc.aio.insecure_channel(cfg.addr("event-bus")) as b,
        grpc.aio.insecure_channel(cfg.addr("policy-audit")) as p,
    ):
        bus = events_pb2_grpc.EventBusServiceStub(b)
        warm = events_pb2.PublishRequest(topic=TOPIC, envelope=sync_started("web", f"warm-{key}"))
        await bus.Publish(warm, metadata=md, timeout=10)

        eater.arm(key.encode())
        trace_id = uuid.uuid4().hex
        traced = [*md, ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bus.Publish(request, metadata=traced, timeout=10)
        err = caught.value
        info = _info(err)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert info.reason == "REDIS_UNAVAILABLE", info
        assert info.metadata["committed"] == "unknown", info
        assert "may have been made" in (err.details() or "")
        await eater.cut.wait()

        # Redis did store it: a plain failure would have been false.
        stored = connect_sync(redis_url).xrange(topic_stream(redis_url, key_prefix, TOPIC))
        assert any(key.encode() in fields[b"e"] for _, fields in stored)

        # Back again, the retry with the same key finds the one event.
        await eater.restore()
        again = await bus.Publish(request, metadata=md, timeout=10, wait_for_ready=True)
        assert again.duplicate

        # One entry for the change, SUCCESS: the record its write committed
        # (the duplicate changed nothing and adds none).
        log = audit_pb2_grpc.AuditServiceStub(p)
        assert info.metadata["audit_request_id"]
        for _ in range(100):
            page = await log.ListEntries(
                audit_pb2.ListEntriesRequest(page_size=1000), metadata=md, timeout=10
            )
            mine = [e for e in page.entries if e.trace_id == trace_id]
            if mine:
                break
            await asyncio.sleep(0.1)
        assert [e.outcome for e in mine] == [audit_pb2.OUTCOME_SUCCESS], mine
        await asyncio.sleep(0.5)
        page = await log.ListEntries(audit_pb2.ListEntriesRequest(page_size=1000), metadata=md)
        assert len([e for e in page.entries if e.action.endswith(".Publish")]) == 2  # warm-up + it
