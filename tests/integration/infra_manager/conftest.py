"""infra-manager fixtures: real Git repositories, the embedded cluster on a real Redis.

The ``infra`` harness runs the manager and reconciler without gRPC; events
and audit entries go to recorders so a test can assert on them. The service
tests (test_service.py) run the real mesh instead: auth-service,
policy-audit, event-bus and infra-manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import message

from autoecoops.kernel.auth.rbac import BUILTIN_ROLES, Binding, Policy, Role, Subject
from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster
from autoecoops.kernel.infra_manager.manager import DEPLOY_PERMISSION, InfraManager
from autoecoops.kernel.infra_manager.model import (
    Application,
    Automated,
    Destination,
    Operation,
    Phase,
    Source,
    SyncPolicy,
)
from autoecoops.kernel.infra_manager.reconcile import Reconciler
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitSource
from autoecoops.kernel.infra_manager.store import InfraStore
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.redis import connect
from tests.conftest import base_key
from tests.integration.infra_manager.gitrepo import GitRepo

ADMIN = Principal("alice", roles=("admin",))
#: The helm and kubectl that ./dev installs (from one npm package) for tests.
TOOLS = Path(__file__).resolve().parents[3] / ".build" / "tools"
#: Fast bounds so failure paths finish in well under a second.
FAST = InfraSettings(
    helm=str(TOOLS / "helm"),
    kubectl=str(TOOLS / "kubectl"),
    reconcile_interval=3600,
    reconcile_jitter=0,
    self_heal_timeout=0,
    wave_timeout=0.5,
    hook_timeout=1.0,
    health_poll=0.02,
    simulate_ready=True,
)


def deployment(name: str, replicas: int = 1, image: str = "nginx:1.25", **annotations: str) -> str:
    """A Deployment manifest."""
    ann = "".join(f'\n    {k}: "{v}"' for k, v in annotations.items())
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}{"" if not ann else chr(10) + "  annotations:" + ann}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: main
          image: {image}
          resources:
            limits: {{cpu: 500m, memory: 128Mi}}
"""


def configmap(name: str, data: dict[str, str] | None = None, **annotations: str) -> str:
    """A ConfigMap manifest."""
    body = "".join(f'\n  {k}: "{v}"' for k, v in (data or {"key": "value"}).items())
    ann = "".join(f'\n    {k}: "{v}"' for k, v in annotations.items())
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}"
        + (f"\n  annotations:{ann}" if ann else "")
        + f"\ndata:{body}\n"
    )


def hook_job(name: str, hook: str, policy: str = "BeforeHookCreation") -> str:
    """A hook Job."""
    return f"""apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
  annotations:
    autoecoops.io/hook: {hook}
    autoecoops.io/hook-delete-policy: {policy}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: busybox
"""


class Events:
    """Records published events (the EventSink the harness uses)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, message.Message, str]] = []

    async def publish(self, payload: message.Message, *, app: str, key: str) -> bool:
        """Record one event."""
        self.items.append((payload.DESCRIPTOR.name, payload, key))
        return True

    def names(self) -> list[str]:
        """The payload message names, in order."""
        return [n for n, _p, _k in self.items]

    def of(self, name: str) -> list[Any]:
        """The payloads of one event type."""
        return [p for n, p, _k in self.items if n == name]


class Audit:
    """Records audit entries (the Auditor the harness uses)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def record(self, **entry: Any) -> int:
        """Record one entry."""
        self.entries.append(entry)
        return len(self.entries)

    def of(self, type_: str) -> list[dict[str, Any]]:
        """The entries of one type."""
        return [e for e in self.entries if e["type"] == type_]


class PolicyAuthorizer:
    """The mesh's RBAC decision over a fixed snapshot (auth's own Policy)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def check(self, principal: Principal, permission: str, namespace: str = "") -> None:
        """Raise PERMISSION_DENIED unless allowed."""
        self.policy.check(principal, permission, namespace)


def team_policy() -> Policy:
    """bob may deploy to namespace team-a only; admins everywhere."""
    deployer = Role("deployer", (DEPLOY_PERMISSION,))
    roles = {r.name: r for r in BUILTIN_ROLES} | {"deployer": deployer}
    return Policy(roles, [Binding("bob-team-a", "deployer", (Subject("user", "bob"),), "team-a")])


@dataclass
class Infra:
    """The manager, reconciler, cluster and a repository of one test."""

    manager: InfraManager
    reconciler: Reconciler
    cluster: EmbeddedCluster
    repo: GitRepo
    events: Events
    audit: Audit
    tmp: Path
    apps: list[str] = field(default_factory=list)

    @property
    def store(self) -> InfraStore:
        """The store."""
        return self.manager.store

    def app(
        self,
        name: str = "web",
        *,
        path: str = "deploy",
        namespace: str = "team-a",
        automated: Automated | None = None,
        **kwargs: Any,
    ) -> Application:
        """An application of this test's repository."""
        return Application(
            name=name,
            source=Source(self.repo.url, "main", path),
            destination=Destination(namespace),
            sync_policy=SyncPolicy(automated=automated, **kwargs.pop("policy", {})),
            **kwargs,
        )

    async def create(self, app: Application, principal: Principal = ADMIN) -> Application:
        """Create an application."""
        return await self.manager.create(app, principal)

    async def sync(
        self, name: str = "web", principal: Principal = ADMIN, **kwargs: Any
    ) -> Operation:
        """Sync and wait for the operation to finish."""
        await self.manager.sync(name, principal, **kwargs)
        op = await self.manager.wait(name)
        assert op is not None
        return op

    async def settle(self, name: str = "web") -> Operation | None:
        """Wait for any running operation, reconcile once more, and wait for what it started."""
        await self.manager.wait(name)
        await self.reconciler.reconcile(name)
        return await self.manager.wait(name)

    async def live(
        self, kind: str, name: str, namespace: str = "team-a", group: str = "", version: str = "v1"
    ) -> dict[str, Any] | None:
        """A live object of the embedded cluster."""
        from autoecoops.kernel.infra_manager.model import Ref

        return await self.cluster.get(Ref(group, version, kind, namespace, name))


@pytest.fixture
async def infra(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Infra]:
    """A manager over a fresh repository and an embedded cluster (simulated controllers on)."""
    redis = connect(redis_url)
    settings = dataclasses.replace(FAST, repo_cache_dir=tmp_path / "cache")
    cluster = EmbeddedCluster(
        redis, base_key(redis_url, key_prefix, "infra-manager") + ":cluster", simulate_ready=True
    )
    events, audit = Events(), Audit()
    git = GitSource(settings.repo_cache_dir)
    manager = InfraManager(
        InfraStore(redis, base_key(redis_url, key_prefix, "infra-manager")),
        lambda _name: cluster,
        git,
        settings,
        events=events,
        audit=audit,
        authorizer=PolicyAuthorizer(team_policy()),
    )
    reconciler = Reconciler(manager, settings, rand=lambda: 0.0)
    harness = Infra(
        manager, reconciler, cluster, GitRepo(tmp_path / "repo"), events, audit, tmp_path
    )
    yield harness
    await manager.close()
    git.close()
    await asyncio.sleep(0)
    await redis.aclose()


def succeeded(op: Operation | None) -> Operation:
    """Assert the operation succeeded (showing its message if not)."""
    assert op is not None
    assert op.phase is Phase.SUCCEEDED, f"{op.phase}: {op.message}"
    return op
