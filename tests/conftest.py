"""Shared fixtures: a real Redis, and in-process mesh servers on free ports."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import SERVICE_NAMES, MeshConfig
from autoecoops.kernel.mesh.server import Mesh, Register, Runtime


def _reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: $REDIS_URL, else the local 6379, else an embedded one."""
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
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    """A TCP port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(**overrides: Any) -> MeshConfig:
    """A config whose services listen on free ports."""
    return dataclasses.replace(
        MeshConfig(ports={name: free_port() for name in SERVICE_NAMES}), **overrides
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
