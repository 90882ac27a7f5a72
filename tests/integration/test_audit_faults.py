"""The audit rule under faults: policy-audit (or Redis) stops in the middle of a
stream of audited calls; afterwards every committed change has exactly one
SUCCESS entry, nothing that did not commit has one, and every answer the
client got was true (docs/policy-audit.md, "The audit rule").

policy-audit runs in a mesh of its own (as in a cluster: its own process,
reached over gRPC), so stopping it leaves auth-service and event-bus up.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect_sync
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc
from tests.conftest import MintToken, StartMesh, base_key, free_port, make_config, topic_stream
from tests.integration.event_bus.conftest import TOPIC, sync_started
from tests.integration.infra_manager.gitrepo import GitRepo

Md = list[tuple[str, str]]


@dataclass
class Answer:
    """What the client was told about one call."""

    kind: str  # "role" or "event"
    name: str
    trace_id: str
    code: grpc.StatusCode
    committed: str  # ErrorInfo metadata "committed" ('' on OK)
    reason: str = ""


def _traceparent() -> tuple[str, str]:
    trace_id = uuid.uuid4().hex
    return trace_id, f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"


def _info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(err.trailing_metadata() or ()).get(STATUS_DETAILS_KEY)
    info = error_details_pb2.ErrorInfo()
    if raw:
        for d in status_pb2.Status.FromString(raw).details:
            if d.Unpack(info):
                break
    return info


async def _call(kind: str, name: str, call: object, trace_id: str) -> Answer:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        info = _info(err)
        return Answer(
            kind, name, trace_id, err.code(), info.metadata.get("committed", ""), info.reason
        )
    return Answer(kind, name, trace_id, grpc.StatusCode.OK, "")


@dataclass
class Stubs:
    """The services under test; memory-hub and infra-manager where they run."""

    auth: auth_pb2_grpc.AuthServiceStub
    bus: events_pb2_grpc.EventBusServiceStub
    memory: memory_pb2_grpc.MemoryServiceStub | None = None
    infra: infra_pb2_grpc.InfraServiceStub | None = None
    repo_url: str = ""
    policy: policy_pb2_grpc.PolicyServiceStub | None = None


async def _stream(s: Stubs, md: Md, n: int, tag: str) -> list[Answer]:
    auth, bus = s.auth, s.bus
    kinds = ["role", "event"] + (["namespace"] if s.memory else []) + (["app"] if s.infra else [])
    kinds += ["bundle"] if s.policy else []
    answers = []
    for i in range(n):
        trace_id, tp = _traceparent()
        meta = [*md, ("traceparent", tp)]
        kind = kinds[i % len(kinds)]
        if kind == "namespace" and s.memory is not None:
            name = f"{tag}-ns-{i}"
            req_ns = memory_pb2.CreateNamespaceRequest(namespace=memory_pb2.Namespace(name=name))
            call = s.memory.CreateNamespace(req_ns, metadata=meta, timeout=1.5)
            answers.append(await _call("namespace", name, call, trace_id))
        elif kind == "app" and s.infra is not None:
            name = f"{tag}-app-{i}"
            app = infra_pb2.Application(
                name=name,
                source=infra_pb2.ApplicationSource(
                    repo_url=s.repo_url, target_revision="main", path="deploy"
                ),
                destination=infra_pb2.ApplicationDestination(namespace="team-a"),
            )
            call_app = s.infra.CreateApplication(
                infra_pb2.CreateApplicationRequest(application=app), metadata=meta, timeout=1.5
            )
            answers.append(await _call("app", name, call_app, trace_id))
        elif kind == "bundle" and s.policy is not None:
            name = f"{tag}-bundle-{i}"
            root = name.replace("-", "_")
            module = policy_pb2.PolicyModule(
                path=f"{root}.rego", source=f"package {root}\n\nallow := true\n"
            )
            bundle = policy_pb2.Bundle(name=name, roots=[root], modules=[module])
            call_b = s.policy.CreateBundle(
                policy_pb2.CreateBundleRequest(bundle=bundle), metadata=meta, timeout=1.5
            )
            answers.append(await _call("bundle", name, call_b, trace_id))
        elif kind == "role":
            name = f"{tag}-role-{i}"
            req = auth_pb2.CreateRoleRequest(
                role=auth_pb2.Role(name=name, permissions=["memory.documents.search"])
            )
            answers.append(
                await _call(
                    "role", name, auth.CreateRole(req, metadata=meta, timeout=1.5), trace_id
                )
            )
        else:
            name = f"{tag}-key-{i}"
            env = sync_started(f"app-{i}", name)
            answers.append(
                await _call(
                    "event",
                    name,
                    bus.Publish(
                        events_pb2.PublishRequest(topic=TOPIC, envelope=env),
                        metadata=meta,
                        timeout=1.5,
                    ),
                    trace_id,
                )
            )
        await asyncio.sleep(0.05)
    return answers


async def _settled(s: Stubs, md: Md, n: int, tag: str) -> list[Answer]:
    """A stream of calls once the mesh answers OK (a loaded machine may need a moment)."""
    answers: list[Answer] = []
    for attempt in range(20):
        got = await _stream(s, md, n, f"{tag}{attempt}")
        answers += got
        if all(x.code == grpc.StatusCode.OK for x in got):
            return answers
        await asyncio.sleep(0.5)
    raise AssertionError(f"the mesh never settled: {answers}")


async def _entries(log: audit_pb2_grpc.AuditServiceStub, md: Md) -> list[audit_pb2.AuditEntry]:
    out: list[audit_pb2.AuditEntry] = []
    token = ""
    while True:
        # (The test's own channel to a restarted policy-audit may still be backing off.)
        page = await log.ListEntries(
            audit_pb2.ListEntriesRequest(page_size=1000, page_token=token),
            metadata=md,
            wait_for_ready=True,
            timeout=30,
        )
        out += page.entries
        token = page.next_page_token
        if not token:
            return out


def _published_keys(redis_url: str, prefix: str) -> set[str]:
    """The idempotency keys of the events stored on TOPIC (the bus's own stream)."""
    from autoecoops.events.v1 import envelope_pb2

    r = connect_sync(redis_url)
    try:
        keys = set()
        for _, fields in r.xrange(topic_stream(redis_url, prefix, TOPIC), "-", "+"):
            env = envelope_pb2.Envelope.FromString(fields[b"e"])
            keys.add(env.idempotency_key)
        return keys
    finally:
        r.close()


async def _exists(s: Stubs, md: Md, a: Answer, published: set[str]) -> bool:
    # A service's first read after Redis restarted may meet a pooled
    # connection the restart closed: read again.
    for _ in range(25):
        try:
            return await _exists_once(s, md, a, published)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)
    return await _exists_once(s, md, a, published)


async def _exists_once(s: Stubs, md: Md, a: Answer, published: set[str]) -> bool:
    try:
        if a.kind == "role":
            await s.auth.GetRole(auth_pb2.GetRoleRequest(name=a.name), metadata=md)
        elif a.kind == "namespace" and s.memory is not None:
            await s.memory.GetNamespace(memory_pb2.GetNamespaceRequest(name=a.name), metadata=md)
        elif a.kind == "bundle" and s.policy is not None:
            await s.policy.GetBundle(policy_pb2.GetBundleRequest(name=a.name), metadata=md)
        elif a.kind == "app" and s.infra is not None:
            await s.infra.GetApplication(infra_pb2.GetApplicationRequest(name=a.name), metadata=md)
        else:
            return a.name in published
        return True
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            raise
        assert err.code() == grpc.StatusCode.NOT_FOUND, (a, err)
        return False


async def _check(
    answers: list[Answer],
    entries: list[audit_pb2.AuditEntry],
    stubs: Stubs,
    md: Md,
    redis_url: str,
    prefix: str,
) -> None:
    success: dict[str, int] = {}
    for e in entries:
        if e.outcome == audit_pb2.OUTCOME_SUCCESS and e.type == "rpc":
            success[e.trace_id] = success.get(e.trace_id, 0) + 1
    published = _published_keys(redis_url, prefix)
    for a in answers:
        changed = await _exists(stubs, md, a, published)
        got = success.get(a.trace_id, 0)
        assert got == (1 if changed else 0), (a, changed, got)
        if a.code == grpc.StatusCode.OK:
            assert changed, a
        elif a.committed == "true":
            assert changed, a  # "committed" was true
        elif a.committed == "unknown":
            # Redis stopped as it ran the write: its reply was lost, so either.
            assert a.reason == "REDIS_UNAVAILABLE", a
        else:
            # A plain failure is only ever told about a call that changed nothing.
            assert not changed, a
            assert a.committed in ("false", ""), a


@pytest.fixture
def md(mint_token: MintToken) -> Md:
    return [("authorization", f"Bearer {mint_token('root', ['admin'])}")]


async def test_policy_audit_stopped_mid_stream(
    start_mesh: StartMesh,
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    md: Md,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_AUDIT", "true")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"deploy/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n"})
    cfg = make_config(
        data_dir=tmp_path, shutdown_grace=0.5, redis_url=redis_url, key_prefix=key_prefix
    )
    # Every kernel service but the log in one process, the log in another.
    await start_mesh(
        ["auth-service", "event-bus", "memory-hub", "infra-manager"], config=cfg, secure=True
    )
    log_mesh: Mesh = await start_mesh(["policy-audit"], config=cfg, secure=True)
    async with (
        grpc.aio.insecure_channel(cfg.addr("auth-service")) as a,
        grpc.aio.insecure_channel(cfg.addr("event-bus")) as b,
        grpc.aio.insecure_channel(cfg.addr("memory-hub")) as m,
        grpc.aio.insecure_channel(cfg.addr("infra-manager")) as i,
        grpc.aio.insecure_channel(cfg.addr("policy-audit")) as p,
    ):
        stubs = Stubs(
            auth_pb2_grpc.AuthServiceStub(a),
            events_pb2_grpc.EventBusServiceStub(b),
            memory_pb2_grpc.MemoryServiceStub(m),
            infra_pb2_grpc.InfraServiceStub(i),
            repo.url,
            policy_pb2_grpc.PolicyServiceStub(p),
        )
        log = audit_pb2_grpc.AuditServiceStub(p)
        before = await _settled(stubs, md, 8, "before")

        async def outage() -> None:
            await asyncio.sleep(0.3)
            # Stopped as an operator stops it (SIGTERM): its in-flight calls finish.
            await log_mesh.stop(grace=1.0)
            await asyncio.sleep(2.5)
            await start_mesh(["policy-audit"], config=cfg, secure=True)

        during, _ = await asyncio.gather(_stream(stubs, md, 40, "during"), outage())
        codes = {x.code for x in during}
        # The outage was seen: some calls were refused or answered "committed".
        assert codes - {grpc.StatusCode.OK}, during
        refused = [x for x in during if x.reason == "AUDIT_LOG_UNAVAILABLE"]
        assert refused and all(x.code == grpc.StatusCode.UNAVAILABLE for x in refused)
        # After the outage, the backlog drains and calls succeed again.
        deadline = time.monotonic() + 15
        while True:
            after = await _stream(stubs, md, 4, f"after-{time.monotonic_ns()}")
            if all(x.code == grpc.StatusCode.OK for x in after) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert all(x.code == grpc.StatusCode.OK for x in after), after
        entries = await _entries(log, md)
        await _check([*before, *during, *after], entries, stubs, md, redis_url, key_prefix)
        # Every answer names the call's actor and trace in its entry.
        by_trace = {e.trace_id: e for e in entries if e.type == "rpc"}
        ok = [x for x in during if x.code == grpc.StatusCode.OK]
        assert ok and all(by_trace[x.trace_id].actor.subject == "root" for x in ok)
        every = [x for x in [*before, *during, *after] if x.code == grpc.StatusCode.OK]
        assert {x.kind for x in every} == {"role", "event", "namespace", "app", "bundle"}


# -- Redis stopped: a Redis of the test's own, never the shared one ---------------


class OwnRedis:
    """A redis-server of this test's own on a free port (never the shared one)."""

    def __init__(self, server: str, data: Path) -> None:
        self.server = server
        self.data = data
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.server, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.data), "--appendonly", "yes", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        _wait_redis(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean stop: the AOF keeps what committed
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    data = tmp_path / "redis"
    data.mkdir()
    own = OwnRedis(server, data)
    own.start()
    yield own
    own.stop()


def _wait_redis(port: int) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.2).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start")


async def test_redis_stopped_mid_stream(
    start_mesh: StartMesh,
    tmp_path: Path,
    key_prefix: str,
    md: Md,
    own_redis: OwnRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = own_redis.url
    monkeypatch.setenv("AUTOECOOPS_EVENT_BUS_AUDIT", "true")
    cfg = make_config(data_dir=tmp_path, shutdown_grace=0.5, redis_url=url, key_prefix=key_prefix)
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"deploy/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n"})
    await start_mesh(
        ["auth-service", "event-bus", "policy-audit", "memory-hub", "infra-manager"],
        config=cfg,
        secure=True,
    )
    async with (
        grpc.aio.insecure_channel(cfg.addr("auth-service")) as a,
        grpc.aio.insecure_channel(cfg.addr("event-bus")) as b,
        grpc.aio.insecure_channel(cfg.addr("memory-hub")) as m,
        grpc.aio.insecure_channel(cfg.addr("infra-manager")) as i,
        grpc.aio.insecure_channel(cfg.addr("policy-audit")) as p,
    ):
        stubs = Stubs(
            auth_pb2_grpc.AuthServiceStub(a),
            events_pb2_grpc.EventBusServiceStub(b),
            memory_pb2_grpc.MemoryServiceStub(m),
            infra_pb2_grpc.InfraServiceStub(i),
            repo.url,
            policy_pb2_grpc.PolicyServiceStub(p),
        )
        log = audit_pb2_grpc.AuditServiceStub(p)
        before = await _settled(stubs, md, 6, "before")

        async def outage() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_redis.stop)
            await asyncio.sleep(1.5)
            await asyncio.to_thread(own_redis.start)

        during, _ = await asyncio.gather(_stream(stubs, md, 40, "during"), outage())
        assert {x.code for x in during} - {grpc.StatusCode.OK}, during
        deadline = time.monotonic() + 15
        while True:
            after = await _stream(stubs, md, 2, f"after-{time.monotonic_ns()}")
            if all(x.code == grpc.StatusCode.OK for x in after) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert all(x.code == grpc.StatusCode.OK for x in after), after
        entries = await _entries(log, md)
        await _check([*before, *during, *after], entries, stubs, md, url, key_prefix)


async def test_both_sides_of_the_rule(
    start_mesh: StartMesh, tmp_path: Path, redis_url: str, key_prefix: str, md: Md
) -> None:
    """A change that committed before the log was found gone answers committed=true
    (and its entry follows); once the relay knows, calls fail UNAVAILABLE and change nothing."""
    cfg = make_config(
        data_dir=tmp_path, shutdown_grace=0.5, redis_url=redis_url, key_prefix=key_prefix
    )
    mesh = await start_mesh(["auth-service"], config=cfg, secure=True)
    log_mesh = await start_mesh(["policy-audit"], config=cfg, secure=True)
    relay = mesh.runtime.auditor.relay  # type: ignore[union-attr]
    relay.probe_interval = 60.0  # the relay learns of the outage only by failing
    async with (
        grpc.aio.insecure_channel(cfg.addr("auth-service")) as a,
        grpc.aio.insecure_channel(cfg.addr("policy-audit")) as p,
    ):
        stubs = Stubs(auth_pb2_grpc.AuthServiceStub(a), events_pb2_grpc.EventBusServiceStub(a))
        ok = await _settled(stubs, md, 1, "up")
        await log_mesh.stop(grace=0)

        # The relay still believes the log is there: the change commits, the
        # deadline runs out waiting for the append, and the answer says so.
        trace_id, tp = _traceparent()
        role = auth_pb2.CreateRoleRequest(role=auth_pb2.Role(name="late", permissions=["a.b.c"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.auth.CreateRole(role, metadata=[*md, ("traceparent", tp)], timeout=1.0)
        info = _info(err.value)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.reason == "AUDIT_APPEND_PENDING" and info.metadata["committed"] == "true"
        assert await _exists(
            stubs, md, Answer("role", "late", trace_id, err.value.code(), ""), set()
        )

        # Now it knows: nothing is changed, and the answer says that too.
        for _ in range(100):
            if not relay.reachable:
                break
            await asyncio.sleep(0.05)
        refused = await _stream(stubs, md, 1, "down")
        assert refused[0].code == grpc.StatusCode.UNAVAILABLE
        assert refused[0].reason == "AUDIT_LOG_UNAVAILABLE" and refused[0].committed == "false"
        assert not await _exists(stubs, md, refused[0], set())
        status = await relay.status()
        box = base_key(redis_url, key_prefix, "auth-service") + ":outbox"
        backlog = status[box]["backlog"]
        assert status["log_reachable"] is False and backlog >= 1
        health = health_pb2_grpc.HealthStub(a)
        check = health_pb2.HealthCheckRequest(service="autoecoops.audit.outbox")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING

        # The log returns: the backlog drains in order, the late change gets its one entry.
        await start_mesh(["policy-audit"], config=cfg, secure=True)
        assert await relay.flush(within=15.0)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        log = audit_pb2_grpc.AuditServiceStub(p)
        entries = await _entries(log, md)
        late = [e for e in entries if e.trace_id == trace_id]
        assert [(e.outcome, e.resource, e.actor.subject) for e in late] == [
            (audit_pb2.OUTCOME_SUCCESS, "role/late", "root")
        ]
        assert not [e for e in entries if e.trace_id == refused[0].trace_id]
        await _check([*ok, *refused], entries, stubs, md, redis_url, key_prefix)
