"""Shared fixtures: a real Redis, and in-process mesh servers on free ports."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import SERVICE_NAMES, MeshConfig
from autoecoops.kernel.mesh.redis import connect_sync, is_cluster_url, service_base
from autoecoops.kernel.mesh.server import Mesh, Register, Runtime
from tests.cluster import LocalCluster, local_cluster
from tests.ports import free_port, free_ports


def _reachable(url: str) -> bool:
    try:
        return bool(connect_sync(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $REDIS_URL (a ``redis+cluster://`` one too), else the local
    6379, else an embedded one."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    if _reachable(url):
        yield url
        return
    from autoecoops.kernel.mesh.redis import EmbeddedRedis

    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield embedded.start()
    embedded.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = connect_sync(redis_url)
    # On a cluster, scan_iter walks every master and delete splits by slot.
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for at in range(0, len(keys), 1000):
        client.delete(*keys[at : at + 1000])
    client.close()


def base_key(redis_url: str, key_prefix: str, service: str) -> str:
    """Where a service's keys start under ``key_prefix``, as ``Runtime.key`` names them
    (with the service's hash tag on a Redis Cluster): for tests that build a store."""
    return service_base(key_prefix, service, is_cluster_url(redis_url))


def topic_stream(redis_url: str, key_prefix: str, topic: str) -> str:
    """The stream of a topic of one partition, as event-bus's store names it: the
    name it always had on one Redis, ``{topic:0}`` under the untagged base on a
    Redis Cluster (kernel/event_bus/store.py, EventStore.keys)."""
    base = base_key(redis_url, key_prefix, "events")
    if not is_cluster_url(redis_url):
        return f"{base}:{topic}"
    return base.replace("{", "").replace("}", "") + f":{{{topic}:0}}"


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A Redis Cluster of this test's own (three masters, three replicas, about
    five seconds to start), for tests that kill its nodes."""
    if not (REDIS_SERVER and shutil.which("redis-cli")):
        pytest.skip("needs redis-server and redis-cli")
    with local_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


def make_config(**overrides: Any) -> MeshConfig:
    """A config whose services listen on free ports."""
    return dataclasses.replace(
        MeshConfig(ports=dict(zip(SERVICE_NAMES, free_ports(len(SERVICE_NAMES)), strict=True))),
        **overrides,
    )


StartMesh = Callable[..., Awaitable[Mesh]]


@pytest.fixture
async def start_mesh(tmp_path: Path, redis_url: str, key_prefix: str) -> AsyncIterator[StartMesh]:
    """Start services in-process on free ports, with their own Redis key prefix.

    ``await start_mesh(["event-bus"], registers={...})`` runs a bare runtime
    (no token is accepted); pass ``secure=True`` for the real thing: tokens
    verified with auth-service's keys and RBAC from its store (start
    "auth-service" too, and sign tokens with the ``mint_token`` fixture).
    """
    meshes: list[Mesh] = []

    async def start(
        names: list[str],
        registers: Mapping[str, Register] | None = None,
        config: MeshConfig | None = None,
        runtime: Runtime | None = None,
        secure: bool = False,
    ) -> Mesh:
        cfg = config or make_config(
            data_dir=tmp_path, shutdown_grace=1.0, redis_url=redis_url, key_prefix=key_prefix
        )
        if runtime is None and not secure:
            runtime = Runtime(config=cfg, clients=ClientFactory(cfg))
        mesh = Mesh(cfg, runtime)
        await mesh.start(names, registers)
        meshes.append(mesh)
        return mesh

    yield start
    for mesh in meshes:
        await mesh.stop(grace=0)


class MintToken:
    """Signs real tokens with the key ring auth-service loads from the test's data dir."""

    def __init__(self, data_dir: Path) -> None:
        from autoecoops.kernel.auth.keys import KeyRing
        from autoecoops.kernel.auth.settings import AuthSettings
        from autoecoops.kernel.auth.tokens import Issuer

        self.settings = AuthSettings.from_env(MeshConfig(data_dir=data_dir), {})
        s = self.settings
        self.ring = KeyRing(s.key_dir, publish_delay=s.publish_delay, max_token_ttl=s.max_token_ttl)
        self.ring.load_or_create()
        self.issuer = Issuer(s.issuer, self.ring)

    def __call__(self, subject: str, roles: list[str] | tuple[str, ...] = (), **kwargs: Any) -> str:
        """``mint_token("alice", ["admin"], ttl=60, groups=[...], act={...})``."""
        kwargs.setdefault("ttl", 300)
        kwargs.setdefault("audience", self.settings.audience)
        return self.issuer.issue(subject, roles=roles, **kwargs).token


@pytest.fixture
def mint_token(tmp_path: Path) -> MintToken:
    """Real tokens for the mesh that ``start_mesh(..., secure=True)`` starts in ``tmp_path``."""
    return MintToken(tmp_path)


REDIS_SERVER = shutil.which("redis-server")


class RedisProcess:
    """A redis-server of a test's own, on a free port and its own data dir, for
    tests that stop, kill or reconfigure Redis (never the shared one)."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.dir = data_dir
        self.args = args
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it (again, on the same data) and wait until it answers."""
        assert REDIS_SERVER is not None, "needs the redis-server binary"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)),
            *("--save", "", *self.args),
            stdout=asyncio.subprocess.DEVNULL,
        )
        probe = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    if await probe.ping():
                        return
                except (aioredis.ConnectionError, aioredis.ResponseError):
                    await asyncio.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            await probe.aclose()

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (a crash or a lost node)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
