"""Starting and stopping the gateway: uvicorn in the mesh's event loop.

``start_gateway(config)`` binds the port, builds the routes from the generated
descriptors and returns a handle with ``.port`` and ``.stop()``.
``MeshWithGateway`` is a ``Mesh`` that also serves the gateway (started after
the gRPC services, stopped before they drain), which is what ``autoecoops up``
and ``autoecoops serve gateway`` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from google.protobuf import descriptor_pool

from autoecoops.gateway.app import Gateway
from autoecoops.gateway.backends import Backends
from autoecoops.gateway.openapi import build_document, route_keys
from autoecoops.gateway.router import Router
from autoecoops.gateway.rules import Binding, mesh_bindings
from autoecoops.gateway.settings import ENV, GatewaySettings
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError
from autoecoops.kernel.mesh.server import Mesh, Register, Runtime
from autoecoops.kernel.mesh.tracing import setup_tracing

log = logging.getLogger("autoecoops.gateway")


def default_document_path() -> Path | None:
    """gen/openapi/openapi.json of the checkout this package runs from, if there is one."""
    import autoecoops

    root = Path(autoecoops.__file__).resolve().parents[2]
    path = root / "openapi" / "openapi.json"
    return path if path.is_file() else None


def load_document(settings: GatewaySettings, bindings: Sequence[Binding]) -> dict[str, Any]:
    """The OpenAPI document to serve: the generated file when it matches the routes.

    The generated file has the proto comments as descriptions. If it is
    missing or describes other routes (a stale checkout), the gateway serves
    a document built from its own routes instead, so what it serves is always
    what it routes.
    """
    live = build_document(bindings)
    path = Path(settings.openapi_file) if settings.openapi_file else default_document_path()
    if settings.openapi_file and not Path(settings.openapi_file).is_file():
        raise ConfigError(f"{ENV}OPENAPI_FILE={settings.openapi_file!r}: no such file")
    if path is None:
        return live
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s); serving a document built from the routes", path, err)
        return live
    if route_keys(document) != route_keys(live):
        log.warning(
            "%s does not match the gateway's routes (regenerate with ./dev gen); "
            "serving a document built from the routes, without descriptions",
            path,
        )
        return live
    return document


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as err:
        raise ConfigError(
            f"{ENV}PORT={port}: cannot listen on {host}:{port} ({err.strerror})"
        ) from None
    sock.set_inheritable(True)
    return sock


class GatewayServer:
    """A running gateway: its ``port`` and ``stop()``."""

    def __init__(self, app: Gateway, server: uvicorn.Server, sock: socket.socket) -> None:
        self.app = app
        self._server = server
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._ticker: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        await self._server.startup(sockets=[self._sock])
        # uvicorn's tick refreshes the Date header and watches should_exit.
        self._ticker = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (the grace period), close channels."""
        self._server.should_exit = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self._server.shutdown(sockets=[self._sock])
        await self.app.backends.close()


async def start_gateway(
    config: MeshConfig,
    settings: GatewaySettings | None = None,
    *,
    bindings: Sequence[Binding] | None = None,
    pool: descriptor_pool.DescriptorPool | None = None,
) -> GatewayServer:
    """Start the REST gateway for ``config``'s mesh; return once it accepts connections.

    Backends are reached at ``config.addr(service)``. ``bindings`` and
    ``pool`` default to the generated services and the default descriptor
    pool; tests pass their own.
    """
    settings = settings or GatewaySettings.from_env()
    setup_tracing("gateway")
    bindings = list(bindings) if bindings is not None else mesh_bindings()
    app = Gateway(
        Router(bindings),
        Backends(config, bindings),
        settings,
        load_document(settings, bindings),
        pool,
    )
    sock = _listen(config.host, settings.port)
    server_config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # leave the process's logging set-up alone
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=max(int(config.shutdown_grace), 1),
    )
    server_config.load()
    # uvicorn logs routine start/stop lines as "uvicorn.error"; keep its warnings only.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = uvicorn.Server(server_config)
    server.lifespan = server_config.lifespan_class(server_config)
    handle = GatewayServer(app, server, sock)
    try:
        await handle._start()
    except BaseException:
        sock.close()
        raise
    log.debug("gateway listening on http://%s:%d", config.host, handle.port)
    return handle


class MeshWithGateway(Mesh):
    """A ``Mesh`` that also serves the REST gateway.

    The gateway starts after the gRPC services (so its first requests find
    them) and stops before they drain (so no REST call arrives at a server
    that is going away). With no service names it runs the gateway alone, as
    ``autoecoops serve gateway`` does in its own pod.
    """

    def __init__(
        self,
        config: MeshConfig,
        runtime: Runtime | None = None,
        settings: GatewaySettings | None = None,
    ) -> None:
        super().__init__(config, runtime)
        self.settings = settings or GatewaySettings.from_env()
        self.gateway: GatewayServer | None = None

    async def start(
        self, names: Sequence[str], registers: Mapping[str, Register] | None = None
    ) -> None:
        """Start ``names`` (possibly none), then the gateway."""
        if names:
            await super().start(names, registers)
        try:
            self.gateway = await start_gateway(self.config, self.settings)
        except BaseException:
            await super().stop(grace=0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        """Stop the gateway, then drain the gRPC services."""
        if self.gateway is not None:
            gateway, self.gateway = self.gateway, None
            await gateway.stop()
        await super().stop(grace)
