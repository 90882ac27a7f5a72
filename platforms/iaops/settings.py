"""IAOps settings, read with the mesh's one config loader (``AUTOECOOPS_IAOPS_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoecoops.kernel.mesh.config import MeshConfig, read_int, read_seconds, read_str

P = "AUTOECOOPS_IAOPS_"


@dataclass(frozen=True, slots=True)
class IaOpsSettings:
    """How IAOps validates, deploys and checks artifacts."""

    #: The OSV database: a directory of OSV JSON records or a zip of them, as
    #: osv.dev's per-ecosystem ``all.zip`` exports are (``..._OSV_PATH``;
    #: default ``<data dir>/iaops/osv``). Read at start and when it changes.
    osv_path: Path = Path(".autoecoops/iaops/osv")
    #: The policy-audit rule deciding who may deploy what where
    #: (``..._DEPLOY_POLICY``); it answers ``{"allow", "reasons"}``.
    deploy_policy: str = "autoecoops/deploy/decision"
    #: The policy-audit rule gating artifacts over verification and scan
    #: (``..._ARTIFACT_POLICY``); it answers ``{"allow", "reasons"}``.
    artifact_policy: str = "autoecoops/supplychain/decision"
    #: Seconds a deployment waits for its sync to become Healthy before it
    #: counts as failed and is rolled back (``..._HEALTH_TIMEOUT_SECONDS``).
    health_timeout: float = 300.0
    #: How often the health of a running sync is read (``..._HEALTH_POLL_SECONDS``).
    health_poll: float = 1.0
    #: Concurrent policy-audit evaluations for Conftest-style rules (``..._REGO_CONCURRENCY``).
    rego_concurrency: int = 16
    #: Seconds a request_id is remembered (``..._REQUEST_ID_TTL_SECONDS``; AIP-155 asks for
    #: at least an hour).
    request_id_ttl: float = 86400.0
    #: Seconds an event publish may take before it is given up (``..._EVENT_TIMEOUT_SECONDS``).
    event_timeout: float = 5.0

    @classmethod
    def from_env(cls, config: MeshConfig, env: Mapping[str, str] | None = None) -> IaOpsSettings:
        """Read and validate; a bad value raises ``ConfigError`` naming the variable."""
        env = os.environ if env is None else env
        d = cls()
        osv = env.get(f"{P}OSV_PATH", "").strip()
        return cls(
            osv_path=Path(osv) if osv else config.data_dir / "iaops" / "osv",
            deploy_policy=read_str(env, f"{P}DEPLOY_POLICY", d.deploy_policy),
            artifact_policy=read_str(env, f"{P}ARTIFACT_POLICY", d.artifact_policy),
            health_timeout=read_seconds(env, f"{P}HEALTH_TIMEOUT_SECONDS", d.health_timeout, 86400),
            health_poll=max(read_seconds(env, f"{P}HEALTH_POLL_SECONDS", d.health_poll, 60), 0.01),
            rego_concurrency=read_int(env, f"{P}REGO_CONCURRENCY", d.rego_concurrency, 1, 256),
            request_id_ttl=read_seconds(
                env, f"{P}REQUEST_ID_TTL_SECONDS", d.request_id_ttl, 30 * 86400
            ),
            event_timeout=read_seconds(env, f"{P}EVENT_TIMEOUT_SECONDS", d.event_timeout, 60),
        )
