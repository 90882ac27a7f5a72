"""infra-manager's wiring: settings, store, clusters, Git, sinks, manager and reconciler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from autoecoops.kernel.auth.mesh import own_clients
from autoecoops.kernel.infra_manager.cluster import Cluster, EmbeddedCluster, KubernetesCluster
from autoecoops.kernel.infra_manager.events import BusPublisher
from autoecoops.kernel.infra_manager.manager import InfraManager
from autoecoops.kernel.infra_manager.reconcile import Reconciler
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitSource
from autoecoops.kernel.infra_manager.store import InfraStore
from autoecoops.kernel.mesh.audit import outbox_for, trail_for
from autoecoops.kernel.mesh.server import Runtime

SERVICE = "infra-manager"
#: Destination cluster names that mean "the cluster the mesh runs in".
IN_CLUSTER = ("", "in-cluster", "https://kubernetes.default.svc")


@dataclass
class Clusters:
    """One Cluster per destination name, made on first use."""

    make: Callable[[str], Cluster]
    _made: dict[str, Cluster] = field(default_factory=dict)

    def __call__(self, name: str) -> Cluster:
        key = "in-cluster" if name in IN_CLUSTER else name
        cluster = self._made.get(key)
        if cluster is None:
            cluster = self._made[key] = self.make(key)
        return cluster


def cluster_factory(runtime: Runtime, settings: InfraSettings) -> Clusters:
    """Embedded clusters in Redis, or Kubernetes (a destination name is a kubeconfig context)."""
    if settings.backend == "kubernetes":

        def kube(name: str) -> Cluster:
            context = settings.kube_context if name == "in-cluster" else name
            return KubernetesCluster.from_kubeconfig(settings.kubeconfig, context, name)

        return Clusters(kube)

    def embedded(name: str) -> Cluster:
        return EmbeddedCluster(
            runtime.redis,
            runtime.key(SERVICE, "cluster"),
            name,
            simulate_ready=settings.simulate_ready,
        )

    return Clusters(embedded)


@dataclass
class InfraApp:
    """Everything the servicer uses."""

    manager: InfraManager
    reconciler: Reconciler

    async def start(self) -> None:
        """Start the reconcile loop."""
        self.reconciler.start()

    async def close(self) -> None:
        """Stop the loop, then cancel running operations."""
        await self.reconciler.stop()
        await self.manager.close()
        self.manager.git.close()


def build(runtime: Runtime, settings: InfraSettings | None = None) -> InfraApp:
    """The service's object graph from the runtime."""
    settings = settings or InfraSettings.from_env(runtime.config)
    git = GitSource(
        settings.repo_cache_dir,
        allow_local=settings.allow_local_repos,
        fetch_interval=settings.git_fetch_interval,
    )
    manager = InfraManager(
        InfraStore(runtime.redis, runtime.key(SERVICE), outbox_for(runtime, SERVICE)),
        cluster_factory(runtime, settings),
        git,
        settings,
        events=BusPublisher(own_clients(runtime, SERVICE), timeout=settings.event_timeout),
        audit=trail_for(runtime, SERVICE),
        authorizer=runtime.authorizer,
    )
    return InfraApp(manager, Reconciler(manager, settings))
