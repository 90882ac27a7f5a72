"""machine-ops settings from the environment (``AUTOECOOPS_MACHINEOPS_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from autoecoops.kernel.mesh.config import read_int, read_seconds, read_str

P = "AUTOECOOPS_MACHINEOPS_"


@dataclass(frozen=True, slots=True)
class MachineOpsSettings:
    """How machine-ops behaves."""

    #: How often agents send a heartbeat, in seconds.
    heartbeat_interval: float = 10.0
    #: How long EvaluateNode waits for the agent when the request names no timeout.
    evaluate_timeout: float = 30.0
    #: The longest timeout a request may ask for.
    max_evaluate_timeout: float = 300.0
    #: An enrollment token's lifetime when the request names none.
    enrollment_ttl: float = 3600.0
    #: The longest lifetime an enrollment token may have.
    max_enrollment_ttl: float = 7 * 86400.0
    #: Agent messages (and session opens) handled at once; the rest queue.
    max_inflight: int = 48
    #: memory-hub namespace searched for documents about each failed control
    #: (``..._CONTEXT_NAMESPACE``; "off" turns the lookup off).
    context_namespace: str = "runbooks"
    #: How long a control's context answer is reused (``..._CONTEXT_CACHE_SECONDS``):
    #: a fleet failing the same control asks memory-hub once per period.
    context_cache: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MachineOpsSettings:
        """Read and validate the settings."""
        env = os.environ if env is None else env
        d = cls()
        return cls(
            heartbeat_interval=read_seconds(env, f"{P}HEARTBEAT_SECONDS", d.heartbeat_interval),
            evaluate_timeout=read_seconds(env, f"{P}EVALUATE_TIMEOUT_SECONDS", d.evaluate_timeout),
            max_evaluate_timeout=read_seconds(
                env, f"{P}MAX_EVALUATE_TIMEOUT_SECONDS", d.max_evaluate_timeout
            ),
            enrollment_ttl=read_seconds(
                env, f"{P}ENROLLMENT_TTL_SECONDS", d.enrollment_ttl, hi=7 * 86400
            ),
            max_enrollment_ttl=d.max_enrollment_ttl,
            max_inflight=read_int(env, f"{P}MAX_INFLIGHT", d.max_inflight, 1, 10_000),
            context_namespace=read_str(env, f"{P}CONTEXT_NAMESPACE", d.context_namespace),
            context_cache=read_seconds(env, f"{P}CONTEXT_CACHE_SECONDS", d.context_cache, hi=86400),
        )
