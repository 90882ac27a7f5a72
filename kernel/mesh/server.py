"""The server bootstrap every service shares.

A ``Mesh`` runs one grpc.aio server per service (one in a pod, all eight on a
laptop). Each server gets grpc.health.v1, server reflection, OpenTelemetry,
the mesh interceptor (auth, validation, metrics, error boundary) and message
size limits. ``stop`` drains: health goes NOT_SERVING first, then in-flight
calls get the grace period to finish.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from autoecoops.kernel.mesh.auth import (
    Authorizer,
    ServiceBound,
    TokenVerifier,
    UnavailableVerifier,
)
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import BY_NAME, MeshConfig, server_options
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.interceptors import CallAuditor, MeshInterceptor
from autoecoops.kernel.mesh.redis import connect, service_base
from autoecoops.kernel.mesh.tracing import flush_tracing, setup_tracing

log = logging.getLogger("autoecoops.mesh")
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: The health "service" whose status says whether audited calls can be served.
AUDIT_HEALTH = "autoecoops.audit.outbox"

#: Where each service's ``register`` lives; imported only when that service runs,
#: so `autoecoops serve auth-service` never loads memory-hub's model.
CATALOG: Mapping[str, str] = {
    "auth-service": "autoecoops.kernel.auth.service",
    "memory-hub": "autoecoops.kernel.memory_hub.service",
    "event-bus": "autoecoops.kernel.event_bus.service",
    "policy-audit": "autoecoops.kernel.policy_audit.service",
    "infra-manager": "autoecoops.kernel.infra_manager.service",
    "autoops": "autoecoops.platforms.autoops.service",
    "iaops": "autoecoops.platforms.iaops.service",
    "machine-ops": "autoecoops.platforms.machine_ops.service",
}


@dataclass
class Runtime:
    """What a service gets to build its servicers with."""

    config: MeshConfig
    clients: ClientFactory
    verifier: TokenVerifier = field(default_factory=UnavailableVerifier)
    #: The services this process serves, in start order (set by ``Mesh.start``).
    services: list[str] = field(default_factory=list)
    authorizer: Authorizer | None = None
    #: Writes the entry of RPCs marked audited; None disables that (tests of the bare runtime).
    auditor: CallAuditor | None = None
    #: Callables run (and awaited if they return a coroutine) on shutdown, last first.
    closers: list[Callable[[], Any]] = field(default_factory=list)
    #: Coroutines a service's ``register`` queues to run before it reports SERVING.
    starters: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: Callables run once every server of the process is SERVING (background work
    #: such as the authorizer's watch of auth-service).
    started: list[Callable[[], Any]] = field(default_factory=list)
    #: Callables run when draining begins, before servers stop: end long-lived
    #: streams (auth's RBAC watch) so clients move on instead of holding shutdown.
    drainers: list[Callable[[], Any]] = field(default_factory=list)
    #: Why a service reports NOT_SERVING though it runs (mesh name -> reason).
    unhealthy: dict[str, str] = field(default_factory=dict)
    _health_hooks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    _redis: aioredis.Redis | None = None

    async def set_unhealthy(self, service: str, reason: str) -> None:
        """Report ``service`` NOT_SERVING because of ``reason`` ('' makes it SERVING again).

        For a state the service cannot serve in and that an operator must fix
        (a signing key that does not match its log): health checks and load
        balancers see it, and the reason is logged once.
        """
        if self.unhealthy.get(service, "") == reason:
            return
        if reason:
            self.unhealthy[service] = reason
            log.error("%s reports NOT_SERVING: %s", service, reason)
        else:
            self.unhealthy.pop(service, None)
            log.info("%s reports SERVING again", service)
        hook = self._health_hooks.get(service)
        if hook is not None:
            await hook()

    @property
    def redis(self) -> aioredis.Redis:
        """The shared Redis client (connects lazily; one pool per process)."""
        if self._redis is None:
            if not self.config.redis_url:
                raise ConfigError("REDIS_URL: no Redis configured for a service that needs one")
            self._redis = connect(self.config.redis_url)
            self.closers.insert(0, self._redis.aclose)
        return self._redis

    def key(self, service: str, *parts: str) -> str:
        """A Redis key ``<prefix><service>:<parts...>`` (DESIGN.md "Data"); on a
        Redis Cluster ``<prefix>{<service>}:<parts...>``, one slot per service
        (``service_base``)."""
        base = service_base(self.config.key_prefix, service, self.config.redis_cluster)
        return ":".join([base, *parts])


class Register(Protocol):
    """A service module's ``register``: add servicers, return their full names."""

    def __call__(self, server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]: ...


def load_register(service: str) -> Register:
    """Import ``service``'s module and return its ``register``."""
    module = importlib.import_module(CATALOG[service])
    register: Register = module.register
    return register


class _Reflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """Server reflection that also resolves method symbols (``pkg.Service.Method``).

    The upb descriptor pool finds services and messages but not methods, so
    ``grpcurl describe pkg.Service.Method`` would fail; answer it with the
    service's file, as the Go and C++ servers do.
    """

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            try:
                if method in self._pool.FindServiceByName(service).methods_by_name:
                    fully_qualified_name = service
            except KeyError:
                pass
        return super()._file_containing_symbol(request, fully_qualified_name)


class ServiceServer:
    """One grpc.aio server for one mesh service."""

    def __init__(self, name: str, runtime: Runtime, register: Register | None = None) -> None:
        self.name = name
        self.runtime = runtime
        self._register = register or load_register(name)
        self.health = health_aio.HealthServicer()
        self.services: list[str] = []
        self.port = 0
        cfg = runtime.config
        verifier = runtime.verifier
        if isinstance(verifier, ServiceBound):
            # Each server accepts only tokens meant for the mesh or for it (aud).
            verifier = verifier.for_service(name)
        self.server = grpc.aio.server(
            interceptors=[
                MeshInterceptor(verifier, runtime.authorizer, runtime.auditor),
            ],
            options=server_options(cfg),
        )

    async def start(self) -> int:
        """Register servicers, bind the port, start, and report SERVING."""
        queued = len(self.runtime.starters)
        self.services = list(self._register(self.server, self.runtime))
        for starter in self.runtime.starters[queued:]:
            await starter()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            _Reflection([*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME]), self.server
        )
        cfg = self.runtime.config
        wanted = cfg.port(self.name)
        try:
            self.port = self.server.add_insecure_port(f"{cfg.host}:{wanted}")
        except RuntimeError:
            env = BY_NAME[self.name].env if self.name in BY_NAME else self.name
            raise ConfigError(
                f"AUTOECOOPS_{env}_PORT={wanted}: cannot listen on {cfg.host}:{wanted} (in use?)"
            ) from None
        await self.server.start()
        self.runtime._health_hooks[self.name] = self._report_health
        await self._report_health()
        self._watch_audit()
        return self.port

    async def _report_health(self) -> None:
        """SERVING, unless the runtime holds a reason this service cannot serve."""
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.name in self.runtime.unhealthy
            else health_pb2.HealthCheckResponse.SERVING
        )
        for svc in ("", *self.services):
            await self.health.set(svc, status)

    def _watch_audit(self) -> None:
        """Health detail of the audit rule: ``autoecoops.audit.outbox`` is NOT_SERVING
        while this process cannot append to the audit log (its audited calls are refused)."""
        relay = getattr(self.runtime.auditor, "relay", None)
        if relay is None:
            return
        serving = health_pb2.HealthCheckResponse.SERVING
        down = health_pb2.HealthCheckResponse.NOT_SERVING
        tasks: set[asyncio.Task[None]] = set()

        def tell(reachable: bool) -> None:
            task = asyncio.ensure_future(
                self.health.set(AUDIT_HEALTH, serving if reachable else down)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        relay.listeners.append(tell)
        tell(bool(relay.reachable))

    async def enter_drain(self) -> None:
        """Report NOT_SERVING everywhere so load balancers stop sending calls."""
        self.runtime._health_hooks.pop(self.name, None)
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuse new calls and give in-flight ones ``grace`` seconds."""
        await self.server.stop(grace)


class Mesh:
    """A set of services run by one process."""

    def __init__(self, config: MeshConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        if runtime is None:
            # The composition root: tokens verified with auth-service's keys,
            # RBAC from its store. Imported here because auth is a service
            # built on this runtime, not part of it.
            from autoecoops.kernel.auth.mesh import secure

            runtime = secure(Runtime(config=config, clients=ClientFactory(config)))
        self.runtime = runtime
        self.servers: list[ServiceServer] = []

    async def start(
        self, names: Sequence[str], registers: Mapping[str, Register] | None = None
    ) -> None:
        """Start ``names`` in order; on a failure, stop what started and re-raise."""
        setup_tracing("autoecoops" if len(names) > 1 else names[0])
        self.runtime.services = [*self.runtime.services, *names]
        try:
            for name in names:
                srv = ServiceServer(name, self.runtime, (registers or {}).get(name))
                self.servers.append(srv)
                await srv.start()
            for hook in self.runtime.started:
                hook()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, wait the drain delay, then stop with the grace period."""
        grace = self.config.shutdown_grace if grace is None else grace
        servers, self.servers = self.servers, []
        await asyncio.gather(*(s.enter_drain() for s in servers))
        if servers:
            for drain in self.runtime.drainers:
                drain()
        if servers and self.config.drain_delay and grace:
            await asyncio.sleep(self.config.drain_delay)
        await asyncio.gather(*(s.stop(grace) for s in servers))
        for close in reversed(self.runtime.closers):
            name = getattr(close, "__qualname__", repr(close))
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    # A stuck closer must not turn a drain into a hang (the
                    # orchestrator would SIGKILL us and lose the rest). Not
                    # wait_for: it waits for the cancelled closer to finish,
                    # which a closer that swallows cancellation never does.
                    task = asyncio.ensure_future(result)
                    done, _ = await asyncio.wait({task}, timeout=max(grace, 1.0))
                    if not done:
                        task.cancel()
                        log.error(
                            "shutdown: %s did not finish within %.1fs; moving on",
                            name,
                            max(grace, 1.0),
                        )
                    elif task.exception() is not None:
                        log.error("shutdown: %s failed", name, exc_info=task.exception())
            except Exception:
                log.exception("shutdown: %s failed", name)
        self.runtime.closers.clear()
        await self.runtime.clients.close()
        # The spans of the last calls are still in the exporter's queue.
        await asyncio.to_thread(flush_tracing)


async def run_until_signalled(
    mesh: Mesh, names: Sequence[str], on_ready: Callable[[Mesh], None]
) -> None:
    """Start ``names``, call ``on_ready``, then drain on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start(names)
        on_ready(mesh)
        await stop.wait()
        log.info("signal received: draining")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await mesh.stop()
