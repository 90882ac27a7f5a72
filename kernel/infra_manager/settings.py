"""infra-manager settings, read with the mesh's one config loader (``AUTOECOOPS_INFRA_MANAGER_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from autoecoops.kernel.mesh.config import MeshConfig, read_bool, read_int, read_seconds, read_str
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.lease import LeaseSettings

P = "AUTOECOOPS_INFRA_MANAGER_"
#: The cluster backends: the embedded store in Redis, or a real Kubernetes API server.
BACKENDS = ("embedded", "kubernetes")


@dataclass(frozen=True, slots=True)
class InfraSettings:
    """How infra-manager reconciles, syncs and reaches Git and the cluster."""

    #: Seconds between two reconciles of one application (``..._RECONCILE_SECONDS``;
    #: Argo CD's default is 180). 0 turns the loop off: only Refresh and Sync act.
    reconcile_interval: float = 180.0
    #: Up to this many seconds are added to each application's interval at
    #: random, so a hundred applications do not all hit Git and the cluster in
    #: the same second (``..._RECONCILE_JITTER_SECONDS``).
    reconcile_jitter: float = 30.0
    #: How often the loop looks for applications that are due (``..._TICK_SECONDS``).
    tick: float = 1.0
    #: Applications reconciled at once (``..._RECONCILE_CONCURRENCY``).
    concurrency: int = 8
    #: Seconds a self-healing application waits after its last sync before it
    #: corrects live drift, so a controller's own writes settle first
    #: (``..._SELF_HEAL_SECONDS``; Argo CD's selfHealTimeout is 5).
    self_heal_timeout: float = 5.0
    #: Report drift everywhere but never sync automatically, whatever the
    #: applications say (``..._DETECT_ONLY``).
    detect_only: bool = False
    #: Seconds a sync wave may take to become Healthy before the sync fails
    #: (``..._WAVE_TIMEOUT_SECONDS``).
    wave_timeout: float = 300.0
    #: Seconds a hook may run before it counts as failed, so a sync never
    #: hangs on a hook (``..._HOOK_TIMEOUT_SECONDS``).
    hook_timeout: float = 600.0
    #: How often a running sync re-reads health while it waits (``..._HEALTH_POLL_SECONDS``).
    health_poll: float = 1.0
    #: Seconds between two fetches of the same remote repository (``..._GIT_FETCH_SECONDS``).
    git_fetch_interval: float = 60.0
    #: Where remote repositories are mirrored (``..._REPO_CACHE_DIR``; default
    #: ``<data dir>/infra-manager/repos``).
    repo_cache_dir: Path = Path(".autoecoops/infra-manager/repos")
    #: Whether a source may be a path or file:// URL on this machine
    #: (``..._ALLOW_LOCAL_REPOS``). Handy on a laptop; turn it off in a pod, so
    #: an application cannot read whatever repository the server can.
    allow_local_repos: bool = True
    #: ``embedded`` (objects in Redis) or ``kubernetes`` (``..._CLUSTER``).
    backend: str = "embedded"
    #: For the embedded cluster: write the status a controller would once an
    #: object is applied (ready replicas, Job complete, PVC bound), so local
    #: syncs finish (``..._EMBEDDED_SIMULATE_READY``). Tests turn it off to
    #: play the controller themselves.
    simulate_ready: bool = True
    #: For kubernetes: the kubeconfig file ('' = in-cluster config, else
    #: ``~/.kube/config``) and context (``..._KUBECONFIG``, ``..._KUBE_CONTEXT``).
    kubeconfig: str = ""
    kube_context: str = ""
    #: Most operations kept per application's history when it names no limit.
    default_history_limit: int = 10
    #: Seconds an event publish may take before it is given up (``..._EVENT_TIMEOUT_SECONDS``).
    event_timeout: float = 5.0
    #: The helm binary for Helm sources: a path, or '' for ``helm`` on PATH (``..._HELM``).
    helm: str = ""
    #: The kubectl binary whose ``kubectl kustomize`` renders Kustomize sources:
    #: a path, or '' for ``kubectl`` on PATH (``..._KUBECTL``).
    kubectl: str = ""
    #: A kustomize binary to use (``kustomize build``) instead of kubectl (``..._KUSTOMIZE``).
    kustomize: str = ""
    #: Seconds one Helm or Kustomize render may take (``..._RENDER_TIMEOUT_SECONDS``).
    render_timeout: float = 60.0
    #: Watch the live state (the embedded cluster's change feed, the Kubernetes
    #: watch API) and compare an application as soon as one of its objects
    #: changes, so self-heal acts in seconds; the periodic reconcile stays as
    #: the safety net (``..._WATCH``).
    watch: bool = True
    #: The leases that keep an application's reconcile, and its operation, on one
    #: replica at a time (mesh-wide ``AUTOECOOPS_LEASE_TTL_SECONDS`` / ``..._RENEW_SECONDS``).
    lease: LeaseSettings = field(default_factory=LeaseSettings)

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> InfraSettings:
        """Read and validate; a bad value raises ``ConfigError`` naming the variable."""
        env = os.environ if env is None else env
        d = cls()
        if not env.get(f"{P}CLUSTER", "").strip() and env.get("KUBERNETES_SERVICE_HOST"):
            # In a pod the default would "sync" into Redis and report success
            # while the real cluster stays untouched.
            raise ConfigError(
                f"{P}CLUSTER is not set and this process runs in a Kubernetes pod: set it to "
                "'kubernetes' (the cluster the pod runs in), or to 'embedded' to choose the "
                "simulator on purpose"
            )
        cache = env.get(f"{P}REPO_CACHE_DIR", "").strip()
        return cls(
            reconcile_interval=read_seconds(
                env, f"{P}RECONCILE_SECONDS", d.reconcile_interval, 86400
            ),
            reconcile_jitter=read_seconds(env, f"{P}RECONCILE_JITTER_SECONDS", d.reconcile_jitter),
            tick=max(read_seconds(env, f"{P}TICK_SECONDS", d.tick, 60), 0.01),
            concurrency=read_int(env, f"{P}RECONCILE_CONCURRENCY", d.concurrency, 1, 256),
            self_heal_timeout=read_seconds(env, f"{P}SELF_HEAL_SECONDS", d.self_heal_timeout),
            detect_only=read_bool(env, f"{P}DETECT_ONLY", d.detect_only),
            wave_timeout=read_seconds(env, f"{P}WAVE_TIMEOUT_SECONDS", d.wave_timeout, 86400),
            hook_timeout=read_seconds(env, f"{P}HOOK_TIMEOUT_SECONDS", d.hook_timeout, 86400),
            health_poll=max(read_seconds(env, f"{P}HEALTH_POLL_SECONDS", d.health_poll, 60), 0.01),
            git_fetch_interval=read_seconds(env, f"{P}GIT_FETCH_SECONDS", d.git_fetch_interval),
            repo_cache_dir=Path(cache) if cache else config.data_dir / "infra-manager" / "repos",
            allow_local_repos=read_bool(env, f"{P}ALLOW_LOCAL_REPOS", d.allow_local_repos),
            backend=read_str(env, f"{P}CLUSTER", d.backend, BACKENDS),
            simulate_ready=read_bool(env, f"{P}EMBEDDED_SIMULATE_READY", d.simulate_ready),
            kubeconfig=env.get(f"{P}KUBECONFIG", "").strip(),
            kube_context=env.get(f"{P}KUBE_CONTEXT", "").strip(),
            default_history_limit=read_int(
                env, f"{P}HISTORY_LIMIT", d.default_history_limit, 1, 1000
            ),
            event_timeout=read_seconds(env, f"{P}EVENT_TIMEOUT_SECONDS", d.event_timeout, 60),
            helm=env.get(f"{P}HELM", "").strip(),
            kubectl=env.get(f"{P}KUBECTL", "").strip(),
            kustomize=env.get(f"{P}KUSTOMIZE", "").strip(),
            watch=read_bool(env, f"{P}WATCH", d.watch),
            render_timeout=max(
                read_seconds(env, f"{P}RENDER_TIMEOUT_SECONDS", d.render_timeout, 3600), 1.0
            ),
            lease=LeaseSettings.from_env(env),
        )
