"""The one config loader: typed settings from ``AUTOECOOPS_*`` variables.

Everything is read and validated once, at start. A bad value raises
``ConfigError`` with one line naming the variable, so ``autoecoops up`` can
print it and exit instead of failing on the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from autoecoops.kernel.mesh.errors import ConfigError

PREFIX = "AUTOECOOPS_"


@dataclass(frozen=True, slots=True)
class ServiceDef:
    """A service of the mesh: its CLI name, default port and env-var stem."""

    name: str
    port: int
    title: str

    @property
    def env(self) -> str:
        """The stem of this service's variables, e.g. ``MEMORY_HUB``."""
        return self.name.upper().replace("-", "_")


#: The port table of DESIGN.md. The order is the start order of `autoecoops up`.
SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef("auth-service", 4001, "auth-service"),
    ServiceDef("memory-hub", 4002, "memory-hub"),
    ServiceDef("event-bus", 4003, "event-bus"),
    ServiceDef("policy-audit", 4004, "policy-audit"),
    ServiceDef("infra-manager", 4005, "infra-manager"),
    ServiceDef("autoops", 5001, "Platform-01 IndestructibleAutoOps"),
    ServiceDef("iaops", 5002, "Platform-02 IAOps"),
    ServiceDef("machine-ops", 5003, "Platform-03 MachineNativeOps"),
)
SERVICE_NAMES = tuple(s.name for s in SERVICES)
#: The mesh service serving each proto domain (``autoecoops.<domain>.v1``).
DOMAIN_SERVICE = {
    "auth": "auth-service",
    "memory": "memory-hub",
    "events": "event-bus",
    "policy": "policy-audit",
    "audit": "policy-audit",
    "infra": "infra-manager",
    "autoops": "autoops",
    "iaops": "iaops",
    "machineops": "machine-ops",
}
BY_NAME = {s.name: s for s in SERVICES}


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Settings shared by every service of the mesh."""

    #: Interface the servers bind to (``AUTOECOOPS_HOST``).
    host: str = "127.0.0.1"
    #: Port per service name (``AUTOECOOPS_<SERVICE>_PORT``).
    ports: Mapping[str, int] = field(default_factory=lambda: {s.name: s.port for s in SERVICES})
    #: Where each service is reached by the others (``AUTOECOOPS_<SERVICE>_ADDR``).
    addrs: Mapping[str, str] = field(default_factory=dict)
    #: Redis; empty means `autoecoops up` starts an embedded one (``REDIS_URL``).
    redis_url: str = ""
    #: Where local state lives: embedded Redis, keys, snapshots (``AUTOECOOPS_DATA_DIR``).
    data_dir: Path = Path(".autoecoops")
    #: Largest request a server accepts, in bytes (``AUTOECOOPS_MAX_MESSAGE_BYTES``).
    max_message_bytes: int = 4 * 1024 * 1024
    #: Seconds in-flight calls get to finish on shutdown (``AUTOECOOPS_SHUTDOWN_GRACE_SECONDS``).
    shutdown_grace: float = 10.0
    #: Seconds between NOT_SERVING and closing the port, so load balancers
    #: notice first (``AUTOECOOPS_DRAIN_DELAY_SECONDS``).
    drain_delay: float = 0.0
    #: Prometheus metrics port; 0 disables it (``AUTOECOOPS_METRICS_PORT``).
    metrics_port: int = 0
    #: Log level name (``AUTOECOOPS_LOG_LEVEL``).
    log_level: str = "INFO"
    #: Prefix of every Redis key (``AUTOECOOPS_KEY_PREFIX``); keys are
    #: ``<prefix><service>:...``. Tests and shared Redis servers set their own.
    key_prefix: str = "autoecoops:"

    def port(self, service: str) -> int:
        """The port ``service`` listens on."""
        return self.ports[service]

    def addr(self, service: str) -> str:
        """Where ``service`` is reached: its ``_ADDR`` override, else host:port."""
        return self.addrs.get(service) or f"{_dial_host(self.host)}:{self.ports[service]}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MeshConfig:
        """Read and validate the configuration; raise ``ConfigError`` naming a bad variable."""
        env = os.environ if env is None else env
        defaults = cls()
        ports = dict(defaults.ports)
        addrs: dict[str, str] = {}
        for svc in SERVICES:
            ports[svc.name] = read_port(env, f"{PREFIX}{svc.env}_PORT", svc.port)
            addr = env.get(f"{PREFIX}{svc.env}_ADDR", "").strip()
            if addr:
                _check_addr(f"{PREFIX}{svc.env}_ADDR", addr)
                addrs[svc.name] = addr
        if len(set(ports.values())) != len(ports):
            raise ConfigError(
                f"{PREFIX}*_PORT: two services share a port: {sorted(ports.values())}"
            )
        redis_url = env.get("REDIS_URL", "").strip()
        if redis_url:
            _check_redis_url(redis_url)
        level = env.get(f"{PREFIX}LOG_LEVEL", defaults.log_level).upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(
                f"{PREFIX}LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR"
            )
        metrics = env.get(f"{PREFIX}METRICS_PORT", "0").strip()
        return cls(
            host=env.get(f"{PREFIX}HOST", defaults.host).strip() or defaults.host,
            ports=ports,
            addrs=addrs,
            redis_url=redis_url,
            data_dir=Path(env.get(f"{PREFIX}DATA_DIR", "") or defaults.data_dir),
            max_message_bytes=read_int(
                env, f"{PREFIX}MAX_MESSAGE_BYTES", defaults.max_message_bytes, 1024, 1 << 30
            ),
            shutdown_grace=read_seconds(
                env, f"{PREFIX}SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace
            ),
            drain_delay=read_seconds(env, f"{PREFIX}DRAIN_DELAY_SECONDS", defaults.drain_delay),
            metrics_port=0 if metrics == "0" else read_port(env, f"{PREFIX}METRICS_PORT", 0),
            log_level=level,
            key_prefix=_key_prefix(
                env.get(f"{PREFIX}KEY_PREFIX", "").strip() or defaults.key_prefix
            ),
        )


def channel_options(config: MeshConfig) -> list[tuple[str, Any]]:
    """gRPC channel arguments every client of the mesh uses (services, gateway, SDK)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _key_prefix(prefix: str) -> str:
    # Glob characters would leak into SCAN patterns and match other tenants' keys.
    if any(c in prefix for c in "*?[]{} \n"):
        raise ConfigError(f"{PREFIX}KEY_PREFIX={prefix!r}: no glob characters, braces or spaces")
    return prefix if prefix.endswith(":") else prefix + ":"


def _dial_host(host: str) -> str:
    # A server bound to every interface is dialled on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(host, host)


def read_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """An integer variable in [lo, hi]; ``ConfigError`` naming ``name`` otherwise."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value}: must be between {lo} and {hi}")
    return value


def read_port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port variable."""
    return read_int(env, name, default, 1, 65535)


def read_seconds(env: Mapping[str, str], name: str, default: float, hi: float = 3600) -> float:
    """A duration variable in seconds, between 0 and ``hi``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a number of seconds") from None
    if not 0 <= value <= hi:
        raise ConfigError(f"{name}={value}: must be between 0 and {hi:g} seconds")
    return value


def read_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def read_str(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...] = ()) -> str:
    """A string variable, optionally one of ``choices``."""
    raw = env.get(name, "").strip() or default
    if choices and raw not in choices:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def _check_addr(name: str, addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={addr!r}: expected host:port")


def _check_redis_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(f"REDIS_URL={url!r}: scheme must be redis://, rediss:// or unix://")
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ConfigError(f"REDIS_URL={url!r}: unix:// needs a socket path")
        return
    try:
        port = parsed.port
    except ValueError:
        raise ConfigError(f"REDIS_URL={url!r}: bad port") from None
    if not parsed.hostname or (port is not None and not 0 < port < 65536):
        raise ConfigError(f"REDIS_URL={url!r}: expected redis://host[:port][/db]")
    db = parsed.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"REDIS_URL={url!r}: database must be a number")
