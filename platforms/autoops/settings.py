"""autoops settings, read with the mesh's one config loader (``AUTOECOOPS_AUTOOPS_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from autoecoops.kernel.mesh.config import read_bool, read_int, read_seconds, read_str
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.lease import LeaseSettings

P = "AUTOECOOPS_AUTOOPS_"
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class AutoOpsSettings:
    """How the platform evaluates SLOs and runs remediations."""

    #: Seconds between two evaluations of every SLO (``..._TICK_SECONDS``); 0 turns
    #: the loop off (EvaluateSlos still evaluates on demand).
    tick: float = 30.0
    #: The Prometheus server PROMETHEUS SLOs query (``..._PROMETHEUS_URL``).
    prometheus_url: str = ""
    #: How long minute buckets of pushed samples are kept (``..._FINE_RETENTION_SECONDS``);
    #: windows up to this use them, longer ones the hour buckets.
    fine_retention: float = 12 * 3600.0
    #: How long hour buckets are kept (``..._COARSE_RETENTION_SECONDS``); at least the
    #: longest period (a quarter).
    coarse_retention: float = 93 * DAY
    #: Seconds per fine bucket (``..._FINE_BUCKET_SECONDS``; 60). Smaller buckets
    #: give sharper short windows at the cost of more hash fields.
    fine_bucket: int = 60
    #: Most samples in one RecordSli (``..._MAX_SAMPLES``).
    max_samples: int = 10_000
    #: Most remediations running at once across the platform (``..._MAX_CONCURRENT``).
    max_concurrent: int = 4
    #: Seconds between two checks of a step's verification (``..._VERIFY_POLL_SECONDS``).
    verify_poll: float = 5.0
    #: The policy-audit data path that decides whether a remediation needs a
    #: human's approval (``..._APPROVAL_POLICY``): true, or {"required": bool,
    #: "reason": str}; the shipped policy is autoecoops/autoops/remediation.rego.
    approval_policy: str = "autoecoops/autoops/remediation/decision"
    #: memory-hub namespace searched for runbooks and incident notes
    #: (``..._CONTEXT_NAMESPACE``; "off" turns the lookup off).
    context_namespace: str = "runbooks"
    #: Webhooks may only call these URL prefixes, comma-separated; empty allows any
    #: (``..._WEBHOOK_ALLOW``).
    webhook_allow: tuple[str, ...] = ()
    #: Publish alert and remediation events on the bus (``..._PUBLISH_EVENTS``).
    publish_events: bool = True
    #: Create the built-in SLOs over the mesh's own RPC metrics at start
    #: (``..._BUILTIN_SLOS``): availability and latency of every kernel service.
    builtin_slos: bool = False
    #: The leases that make an evaluation and a remediation run on one replica at a
    #: time (mesh-wide ``AUTOECOOPS_LEASE_TTL_SECONDS`` / ``..._RENEW_SECONDS``).
    lease: LeaseSettings = field(default_factory=LeaseSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AutoOpsSettings:
        """Read and validate; a bad value fails start with one line."""
        env = os.environ if env is None else env
        d = cls()
        fine = read_seconds(env, P + "FINE_RETENTION_SECONDS", d.fine_retention, 30 * DAY)
        coarse = read_seconds(env, P + "COARSE_RETENTION_SECONDS", d.coarse_retention, 400 * DAY)
        if fine < 6 * 3600:
            raise ConfigError(f"{P}FINE_RETENTION_SECONDS={fine:g}: at least 21600 (the 6h window)")
        url = read_str(env, P + "PROMETHEUS_URL", d.prometheus_url)
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{P}PROMETHEUS_URL={url}: must be an http(s) URL")
        allow = tuple(
            p.strip() for p in read_str(env, P + "WEBHOOK_ALLOW", "").split(",") if p.strip()
        )
        return cls(
            tick=read_seconds(env, P + "TICK_SECONDS", d.tick, 3600),
            prometheus_url=url,
            fine_retention=fine,
            coarse_retention=coarse,
            fine_bucket=read_int(env, P + "FINE_BUCKET_SECONDS", d.fine_bucket, 1, 3600),
            max_samples=read_int(env, P + "MAX_SAMPLES", d.max_samples, 1, 1_000_000),
            max_concurrent=read_int(env, P + "MAX_CONCURRENT", d.max_concurrent, 1, 1000),
            verify_poll=read_seconds(env, P + "VERIFY_POLL_SECONDS", d.verify_poll, 600),
            approval_policy=read_str(env, P + "APPROVAL_POLICY", d.approval_policy),
            context_namespace=read_str(env, P + "CONTEXT_NAMESPACE", d.context_namespace),
            webhook_allow=allow,
            publish_events=read_bool(env, P + "PUBLISH_EVENTS", d.publish_events),
            builtin_slos=read_bool(env, P + "BUILTIN_SLOS", d.builtin_slos),
            lease=LeaseSettings.from_env(env),
        )
