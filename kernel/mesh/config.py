"""The one config loader: typed settings from ``AUTOECOOPS_*`` variables.

Everything is read and validated once, at start. A bad value raises
``ConfigError`` with one line naming the variable, so ``autoecoops up`` can
print it and exit instead of failing on the first request.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.redis_url import is_cluster_url, parse_cluster_url

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
    #: Where each service is reached by the others (``AUTOECOOPS_<SERVICE>_ADDR``):
    #: ``host:port``, a list of replicas ``ip:port,ip:port``, or a DNS name whose
    #: records are the replicas, ``dns:///name:port`` (see ``dial_target``).
    addrs: Mapping[str, str] = field(default_factory=dict)
    #: Redis; empty means `autoecoops up` starts an embedded one (``REDIS_URL``);
    #: ``redis+cluster://host:port,host:port`` is a Redis Cluster's seed nodes.
    redis_url: str = ""
    #: Replicas that must confirm an audit-log commit before it is acknowledged
    #: (``AUTOECOOPS_REDIS_WAIT_REPLICAS``; default 1 on a cluster, else 0). See
    #: ``replicated`` in redis.py and docs/scale.md.
    redis_wait_replicas: int | None = None
    #: Milliseconds a commit waits for them (``AUTOECOOPS_REDIS_WAIT_TIMEOUT_MS``).
    redis_wait_timeout_ms: int = 1000
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
    #: Seconds between the keepalive pings a client sends on a channel, busy
    #: or idle (``AUTOECOOPS_KEEPALIVE_SECONDS``); servers accept pings this
    #: often (``server_options``), so an idle mesh is never sent GOAWAY.
    keepalive_time: float = 30.0
    #: Seconds a client waits for a ping's ack before it drops the connection
    #: (``AUTOECOOPS_KEEPALIVE_TIMEOUT_SECONDS``).
    keepalive_timeout: float = 20.0

    @property
    def redis_cluster(self) -> bool:
        """Whether ``redis_url`` names a Redis Cluster."""
        return is_cluster_url(self.redis_url)

    @property
    def wait_replicas(self) -> int:
        """Replicas a durable write waits for: the setting, else 1 on a cluster, else 0."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_cluster else 0

    def port(self, service: str) -> int:
        """The port ``service`` listens on."""
        return self.ports[service]

    def addr(self, service: str) -> str:
        """The gRPC target of ``service``: its ``_ADDR`` override (a list of
        replicas in gRPC's ``ipv4:``/``ipv6:`` form), else host:port."""
        addr = self.addrs.get(service)
        if addr:
            return dial_target(addr)
        return f"{_dial_host(self.host)}:{self.ports[service]}"

    def replicated(self, service: str) -> bool:
        """Whether ``service`` is reached at several replicas (a list or a ``dns:`` name)."""
        return is_replica_set(self.addrs.get(service, ""))

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
        redis_url = read_secret(env, "REDIS_URL")
        if redis_url:
            _check_redis_url(redis_url)
        level = env.get(f"{PREFIX}LOG_LEVEL", defaults.log_level).upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(
                f"{PREFIX}LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR"
            )
        metrics = env.get(f"{PREFIX}METRICS_PORT", "0").strip()
        wait = env.get(f"{PREFIX}REDIS_WAIT_REPLICAS", "").strip()
        return cls(
            host=env.get(f"{PREFIX}HOST", defaults.host).strip() or defaults.host,
            ports=ports,
            addrs=addrs,
            redis_url=redis_url,
            redis_wait_replicas=read_int(env, f"{PREFIX}REDIS_WAIT_REPLICAS", 0, 0, 16)
            if wait
            else None,
            redis_wait_timeout_ms=read_int(
                env, f"{PREFIX}REDIS_WAIT_TIMEOUT_MS", defaults.redis_wait_timeout_ms, 1, 60_000
            ),
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
            keepalive_time=_positive_seconds(
                env, f"{PREFIX}KEEPALIVE_SECONDS", defaults.keepalive_time
            ),
            keepalive_timeout=_positive_seconds(
                env, f"{PREFIX}KEEPALIVE_TIMEOUT_SECONDS", defaults.keepalive_timeout
            ),
        )


def channel_options(config: MeshConfig) -> list[tuple[str, Any]]:
    """gRPC channel arguments every client of the mesh uses (services, gateway, SDK).

    Keepalive pings go out every ``keepalive_time`` on idle channels too, so a
    connection a NAT or load balancer silently dropped is noticed before a call
    is lost on it. ``server_options`` is the other half of that agreement.
    """
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC otherwise stops after two pings without data and then throttles
        # to one a minute, so the interval above would not be the interval.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(config: MeshConfig) -> list[tuple[str, Any]]:
    """gRPC server arguments of every mesh server, agreeing with ``channel_options``.

    gRPC's default server policy allows one ping per five minutes, and none
    without a call in flight; a client pinging every 30 s collects two strikes
    and is sent ``GOAWAY too_many_pings``, which failed the first calls after
    an idle spell. Here a server accepts pings without calls and as often as
    half the clients' interval (timers fire early by a few milliseconds).
    """
    min_ping = max(1, _ms(config.keepalive_time) // 2)
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its string
        # is the older name below, which is the one gRPC core reads.
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _positive_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = read_seconds(env, name, default, hi=7200)
    if value <= 0:
        raise ConfigError(f"{name}={value}: must be more than 0 seconds")
    return value


def _key_prefix(prefix: str) -> str:
    # Glob characters would leak into SCAN patterns and match other tenants' keys.
    if any(c in prefix for c in "*?[]{} \n"):
        raise ConfigError(f"{PREFIX}KEY_PREFIX={prefix!r}: no glob characters, braces or spaces")
    return prefix if prefix.endswith(":") else prefix + ":"


def _dial_host(host: str) -> str:
    # A server bound to every interface is dialled on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(host, host)


def read_secret(env: Mapping[str, str], name: str) -> str:
    """A secret from ``name`` or from the file ``<name>_FILE`` names (a mounted
    Kubernetes Secret, Docker secrets' convention), stripped; '' when neither is set.

    Files keep secrets out of the process environment, which ``/proc/<pid>/environ``,
    crash reports and child processes see. Setting both is refused: which one
    wins would be a guess.
    """
    direct, path = env.get(name, "").strip(), env.get(f"{name}_FILE", "").strip()
    if direct and path:
        raise ConfigError(f"{name} and {name}_FILE are both set; set one")
    if not path:
        return direct
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"{name}_FILE={path!r}: {err.strerror or err}") from None


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
    try:
        dial_target(addr)
    except ValueError as err:
        raise ConfigError(f"{name}={addr!r}: {err}") from None


def _host_port(entry: str) -> tuple[str, int]:
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry.strip()!r} is not host:port")
    return host, int(port)


def is_replica_set(addr: str) -> bool:
    """Whether ``addr`` names several replicas: a comma-separated list, or a
    resolver target (``dns:``, ``ipv4:``, ``ipv6:``) that may resolve to several."""
    return "," in addr or addr.startswith(("dns:", "ipv4:", "ipv6:"))


def dial_target(addr: str) -> str:
    """The gRPC target of an ``_ADDR`` value; ``ValueError`` saying what is wrong.

    ``host:port`` and ``dns:///name:port`` pass through (gRPC's DNS resolver
    returns every record of the name, and re-resolves when a connection
    drops). A list ``ip:port,ip:port`` becomes ``ipv4:ip:port,ip:port`` (or
    ``ipv6:``), gRPC's static multi-address target: it takes IP literals only,
    of one family, so a list of names is refused rather than resolved once
    here and never again (a DNS name with several records does that job).
    """
    addr = addr.strip()
    if addr.startswith(("dns:", "ipv4:", "ipv6:")):
        scheme, _, rest = addr.partition(":")
        body = rest[2:].partition("/")[2] if rest.startswith("//") else rest
        entries = body.split(",") if scheme != "dns" else [body]
        for entry in entries:
            _host_port(entry)
        return addr
    if "," not in addr:
        _host_port(addr)
        return addr
    families: set[int] = set()
    hosts: list[str] = []
    for entry in addr.split(","):
        if not entry.strip():
            raise ValueError("an empty entry in the list")
        host, port = _host_port(entry)
        bare = "127.0.0.1" if host == "localhost" else host.strip("[]")
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            raise ValueError(
                f"{host!r}: a list of replicas takes IP addresses; for names use "
                "one DNS name with a record per replica, dns:///name:port"
            ) from None
        families.add(ip.version)
        hosts.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) > 1:
        raise ValueError("a list of replicas takes IPv4 or IPv6 addresses, not both")
    return f"ipv{families.pop()}:{','.join(hosts)}"


#: Which status of the grpc.health.v1 service says a replica may take calls:
#: '' is the whole server's, which every mesh server reports (NOT_SERVING from
#: the start of its drain, or while ``Runtime.set_unhealthy`` holds a reason).
HEALTH_CHECK_SERVICE = ""


def replica_service_config(retry_methods: Sequence[tuple[str, str]] = ()) -> str:
    """The gRPC service config of a channel to several replicas, as JSON.

    ``round_robin`` spreads calls over every READY replica; client-side health
    checking (``healthCheckConfig``, gRFC A17) watches each replica's
    grpc.health.v1 status and takes one that reports NOT_SERVING out of the
    rotation, as it does a replica whose connection dropped. ``retry_methods``
    ((service, method) pairs, the idempotent ones) are retried on UNAVAILABLE,
    and each attempt is picked anew, so it goes to another replica.
    """
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": HEALTH_CHECK_SERVICE},
    }
    if retry_methods:
        config["methodConfig"] = [
            {
                "name": [{"service": s, "method": m} for s, m in retry_methods],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def replica_options(retry_methods: Sequence[tuple[str, str]] = ()) -> list[tuple[str, Any]]:
    """Channel arguments for a target of several replicas (``replica_service_config``)."""
    return [
        ("grpc.service_config", replica_service_config(retry_methods)),
        # The service config above is the policy; a resolver (DNS TXT records)
        # must not replace it.
        ("grpc.service_config_disable_resolution", 1),
    ]


def _check_redis_url(url: str) -> None:
    if is_cluster_url(url):
        try:
            parse_cluster_url(url)
        except ValueError as err:
            raise ConfigError(f"REDIS_URL={url!r}: {err}") from None
        return
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(
            f"REDIS_URL={url!r}: scheme must be redis://, rediss://, unix:// or redis+cluster://"
        )
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
