"""Acknowledged audit entries and events survive a Redis Cluster master failover.

policy-audit runs on a real cluster (three masters, three replicas). Writers
append through its gRPC API (AppendEntry and BatchAppendEntries, each
request retried under its own request id until it is acknowledged) while the
master owning the audit log's slot is SIGKILLed. Its replica is paused
(SIGSTOP) and its replication link cut for a while just before, so the
master takes writes that never reach it: without WAIT those would be acknowledged and then lost with the
master (the test fails with ``AUTOECOOPS_REDIS_WAIT_REPLICAS=0``). With it,
they are refused (REPLICATION_PENDING) and retried, the promoted replica
holds every acknowledged entry, the log verifies against its signed
checkpoint, and the same service answers again without a restart: at once,
since the promoted master has no replica that a failover could promote over
it, and on after the killed node is back as its replica. A replica that is
down (not failed over) keeps its master's writes waiting: those are what a
failover could lose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect, service_base
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteVerifier
from autoecoops.kernel.policy_audit.store import AuditStore
from autoecoops.kernel.policy_audit.verify import verify
from tests.cluster import LocalCluster
from tests.conftest import MintToken, StartMesh, make_config
from tests.integration.event_bus.conftest import sync_started
from tests.integration.policy_audit.conftest import entry

PREFIX = "autoecoops-failover:"
WRITERS = 4


@dataclasses.dataclass
class Acks:
    """What the writers were told: request id -> acknowledged index."""

    index: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Published events: idempotency key -> acknowledged event id.
    events: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Codes of the failed attempts (each retried under the same request id).
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ErrorInfo reasons of the failed attempts.
    reasons: set[str] = dataclasses.field(default_factory=set)
    #: Acknowledgements that arrived after the master was killed.
    after_kill: int = 0
    killed: bool = False

    @property
    def attempts(self) -> int:
        """Calls made so far, acknowledged or not."""
        return len(self.index) + len(self.events) + sum(self.failures.values())


@pytest.fixture
async def mesh(
    start_mesh: StartMesh, redis_cluster: LocalCluster, tmp_path: Path
) -> AsyncIterator[Mesh]:
    config = make_config(
        data_dir=tmp_path,
        shutdown_grace=1.0,
        redis_url=redis_cluster.url,
        key_prefix=PREFIX,
        redis_wait_replicas=_wait_override(),
    )
    yield await start_mesh(["auth-service", "policy-audit"], config=config, secure=True)


async def _writer(
    n: int,
    stub: audit_pb2_grpc.AuditServiceStub,
    md: list[tuple[str, str]],
    acks: Acks,
    stop: asyncio.Event,
) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        batch = seq % 3 == 0  # every third request is a batch of three
        ids = [f"w{n}-{seq}-{i}" for i in range(3 if batch else 1)]
        while True:  # the same request ids until acknowledged: a retry is one entry
            try:
                if batch:
                    reply = await stub.BatchAppendEntries(
                        audit_pb2.BatchAppendEntriesRequest(
                            requests=[
                                audit_pb2.AppendEntryRequest(entry=entry(seq), request_id=r)
                                for r in ids
                            ]
                        ),
                        metadata=md,
                        timeout=10,
                    )
                    indexes = [e.index for e in reply.entries]
                else:
                    one = await stub.AppendEntry(
                        audit_pb2.AppendEntryRequest(entry=entry(seq), request_id=ids[0]),
                        metadata=md,
                        timeout=10,
                    )
                    indexes = [one.index]
            except grpc.aio.AioRpcError as err:
                name = err.code().name
                acks.failures[name] = acks.failures.get(name, 0) + 1
                acks.reasons.add(_reason(err))
                await asyncio.sleep(0.2)
                continue
            for r, i in zip(ids, indexes, strict=True):
                acks.index[r] = i
            if acks.killed:
                acks.after_kill += len(ids)
            break


async def _until(what: str, check: object, within: float = 60.0) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


async def test_acknowledged_audit_entries_survive_a_master_failover(
    mesh: Mesh, redis_cluster: LocalCluster, mint_token: MintToken
) -> None:
    if _wait_override() is None:
        assert mesh.config.wait_replicas == 1  # on by default on a cluster
    md = [("authorization", f"Bearer {mint_token('auditor', ['admin'])}")]
    channel = grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    base = service_base(PREFIX, "policy-audit", cluster=True) + ":{audit}"
    master = redis_cluster.master_for(base + ":head")
    acks, stop = Acks(), asyncio.Event()
    writers = [asyncio.create_task(_writer(n, stub, md, acks, stop)) for n in range(WRITERS)]
    [replica] = redis_cluster.replicas_of(master)
    try:
        await _until("entries are acknowledged", _count(acks, 40))
        # The replica hangs and its link is cut (what the master had sent
        # before still waits in the replica's socket, so the cut is needed):
        # the master goes on taking writes the replica never gets.
        redis_cluster.pause(replica)
        master.client().client_kill_filter(_type="replica")
        try:
            await _until("appends were made during the pause", _attempts(acks, acks.attempts + 12))
            acks.killed = True
            redis_cluster.kill(master)  # mid-traffic: appends are in flight
        finally:
            redis_cluster.resume(replica)
        # A replica takes over the slot; the service finds it by itself. The
        # promoted master has no replica (the dead node was its only peer), so no
        # failover can lose its writes: appends are acknowledged again without
        # waiting for the dead node to come back.
        await _until("a replica is promoted", _promoted(redis_cluster, base, master))
        unreplicated = _unreplicated()
        await _until("appends succeed again", _after_kill(acks, 30), within=120)
        # ... and say so, for an alert: acknowledged without a replica.
        assert _unreplicated() > unreplicated or not mesh.config.wait_replicas
        # The dead node returns, as a restarted pod would, as the new master's
        # replica: WAIT applies again and appends go on.
        redis_cluster.restart(master)
        await _until("appends go on with a replica", _after_kill(acks, 60), within=120)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers, return_exceptions=True), timeout=60)

    redis = connect(redis_cluster.url)
    try:
        store = AuditStore(redis, base)
        logged = await store.requests(list(acks.index))
        lost = sorted(set(acks.index) - set(logged))
        assert not lost, f"acknowledged but lost in the failover: {lost[:10]}"
        moved = {r: (i, logged[r][0]) for r, i in acks.index.items() if logged[r][0] != i}
        assert not moved, f"acknowledged at one index, logged at another: {moved}"
        # The whole log verifies against the checkpoint the service signs now.
        cp = await stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md, timeout=10)
        body = CheckpointBody.parse(
            NoteVerifier.from_vkey(cp.verifier_key).open(cp.checkpoint.signed_note)
        )
        assert body.size >= len(acks.index)
        result = await verify(store, body)
        assert result.ok, [str(f) for f in result.findings]
        # The pause was seen: acknowledgements waited for the replica.
        assert "REPLICATION_PENDING" in acks.reasons, acks.reasons
    finally:
        await redis.aclose()
        await channel.close()


def _unreplicated() -> float:
    """Writes acknowledged without WAIT for want of a replica, over every master."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "autoecoops_redis_unreplicated_acks"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def _reason(err: grpc.aio.AioRpcError) -> str:
    raw = dict(err.trailing_metadata() or ()).get(STATUS_DETAILS_KEY)
    if raw:
        for d in status_pb2.Status.FromString(raw).details:
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info):
                return info.reason
    return err.code().name


def _attempts(acks: Acks, n: int) -> object:
    async def check() -> bool:
        return acks.attempts >= n

    return check


def _count(acks: Acks, n: int) -> object:
    async def check() -> bool:
        return len(acks.index) >= n

    return check


def _after_kill(acks: Acks, n: int) -> object:
    async def check() -> bool:
        return acks.after_kill >= n

    return check


def _promoted(cluster: LocalCluster, base: str, old: object) -> object:
    async def check() -> bool:
        try:
            now = await asyncio.to_thread(cluster.master_for, base + ":head")
        except Exception:  # the slot map is in flux
            return False
        return now is not old

    return check


# -- published events ------------------------------------------------------------

TOPIC = "infra.sync"


async def _publisher(
    n: int,
    stub: events_pb2_grpc.EventBusServiceStub,
    md: list[tuple[str, str]],
    acks: Acks,
    stop: asyncio.Event,
) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        key = f"p{n}-{seq}"
        env = sync_started(f"app{n}", key)
        while True:  # the same idempotency key until acknowledged: a retry is one event
            try:
                reply = await stub.Publish(
                    events_pb2.PublishRequest(topic=TOPIC, envelope=env), metadata=md, timeout=10
                )
            except grpc.aio.AioRpcError as err:
                name = err.code().name
                acks.failures[name] = acks.failures.get(name, 0) + 1
                acks.reasons.add(_reason(err))
                await asyncio.sleep(0.2)
                continue
            acks.events[key] = reply.event_id
            if acks.killed:
                acks.after_kill += 1
            break


@pytest.fixture
async def bus_mesh(
    start_mesh: StartMesh, redis_cluster: LocalCluster, tmp_path: Path
) -> AsyncIterator[Mesh]:
    config = make_config(
        data_dir=tmp_path,
        shutdown_grace=1.0,
        redis_url=redis_cluster.url,
        key_prefix=PREFIX,
        redis_wait_replicas=_wait_override(),
    )
    yield await start_mesh(
        ["auth-service", "policy-audit", "event-bus"], config=config, secure=True
    )


async def test_acknowledged_events_survive_a_master_failover(
    bus_mesh: Mesh, redis_cluster: LocalCluster, mint_token: MintToken
) -> None:
    """The same failover under publish traffic: every event event-bus acknowledged
    (Publish answered OK with its id) is in the partition's stream afterwards."""
    md = [("authorization", f"Bearer {mint_token('publisher', ['admin'])}")]
    channel = grpc.aio.insecure_channel(bus_mesh.config.addr("event-bus"))
    stub = events_pb2_grpc.EventBusServiceStub(channel)
    # A topic of one partition is the stream {topic:0} on a cluster, in a slot of
    # its own (not event-bus's): its master is the one killed.
    base = service_base(PREFIX, "events", cluster=True).replace("{", "").replace("}", "")
    stream = f"{base}:{{{TOPIC}:0}}"
    acks, stop = Acks(), asyncio.Event()
    pubs = [asyncio.create_task(_publisher(n, stub, md, acks, stop)) for n in range(WRITERS)]
    try:
        await _until("events are acknowledged", _events(acks, 40))
        master = redis_cluster.master_for(stream)
        [replica] = redis_cluster.replicas_of(master)
        redis_cluster.pause(replica)
        master.client().client_kill_filter(_type="replica")
        try:
            await _until(
                "publishes were made during the pause", _attempts(acks, acks.attempts + 12)
            )
            acks.killed = True
            redis_cluster.kill(master)
        finally:
            redis_cluster.resume(replica)
        await _until("a replica is promoted", _promoted(redis_cluster, stream, master))
        await _until("publishes succeed again", _after_kill(acks, 30), within=120)
        redis_cluster.restart(master)
        await _until("publishes go on with a replica", _after_kill(acks, 60), within=120)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*pubs, return_exceptions=True), timeout=60)

    redis = connect(redis_cluster.url)
    try:
        stored = {_text(i) for i, _ in await redis.xrange(stream, "-", "+")}
        lost = sorted(k for k, i in acks.events.items() if i not in stored)
        assert not lost, f"acknowledged but lost in the failover: {lost[:10]}"
        assert "REPLICATION_PENDING" in acks.reasons, acks.reasons
    finally:
        await redis.aclose()
        await channel.close()


def _events(acks: Acks, n: int) -> object:
    async def check() -> bool:
        return len(acks.events) >= n

    return check


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _wait_override() -> int | None:
    """``AUTOECOOPS_REDIS_WAIT_REPLICAS`` when set: with 0 these tests must fail (lost writes)."""
    raw = os.environ.get("AUTOECOOPS_REDIS_WAIT_REPLICAS", "")
    return int(raw) if raw else None


async def test_a_master_whose_replica_is_down_acknowledges_nothing_until_it_returns(
    mesh: Mesh, redis_cluster: LocalCluster, mint_token: MintToken
) -> None:
    """Only a master with no replica at all acknowledges without WAIT: one whose
    replica is down (still listed by the cluster) refuses (REPLICATION_PENDING,
    committed) until the replica is back."""
    md = [("authorization", f"Bearer {mint_token('auditor', ['admin'])}")]
    channel = grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    base = service_base(PREFIX, "policy-audit", cluster=True) + ":{audit}"
    master = redis_cluster.master_for(base + ":head")
    [replica] = redis_cluster.replicas_of(master)
    try:
        await stub.AppendEntry(
            audit_pb2.AppendEntryRequest(entry=entry(0), request_id="before"), metadata=md
        )
        redis_cluster.kill(replica)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AppendEntry(
                audit_pb2.AppendEntryRequest(entry=entry(1), request_id="down"),
                metadata=md,
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(err.value) == "REPLICATION_PENDING"
        redis_cluster.restart(replica)
        deadline = time.monotonic() + 60
        while True:  # the same request id: acknowledged once the replica has it
            try:
                reply = await stub.AppendEntry(
                    audit_pb2.AppendEntryRequest(entry=entry(1), request_id="down"),
                    metadata=md,
                    timeout=10,
                )
                break
            except grpc.aio.AioRpcError as again:
                assert _reason(again) == "REPLICATION_PENDING", _reason(again)
                assert time.monotonic() < deadline, "never acknowledged after the replica returned"
                await asyncio.sleep(0.2)
        assert reply.index == 1  # the entry committed while refused, not a second one
    finally:
        await channel.close()
