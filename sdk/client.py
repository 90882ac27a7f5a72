"""``Client`` and ``AsyncClient``: one object for the whole mesh.

Each service is an attribute (``client.memory``, ``client.events``, ...)
whose methods are its RPCs in snake_case. Addresses come from the arguments
or from the ``AUTOECOOPS_*`` variables (``MeshConfig``), the same ones the
servers read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

import grpc

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.sdk.calls import Timeout
from autoecoops.sdk.channels import TLS, Routes
from autoecoops.sdk.clock import SYSTEM, Clock
from autoecoops.sdk.credentials import Credentials
from autoecoops.sdk.retry import DEFAULT_RETRY, Retry, RetryThrottle
from autoecoops.sdk.services import AsyncServices, Services
from autoecoops.sdk.transport import AsyncTransport, SyncTransport

#: The overall deadline of a unary call when neither client nor call sets one.
DEFAULT_TIMEOUT = 30.0


class _Connection:
    """The settings of a client and the transport built from them."""

    _transport: Any
    _transport_type: ClassVar[type[SyncTransport] | type[AsyncTransport]]

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        addresses: Mapping[str, str | Sequence[str]] | None = None,
        config: MeshConfig | None = None,
        credentials: Credentials | None = None,
        tls: bool | TLS | None = None,
        allow_insecure_credentials: bool = False,
        retry: Retry = DEFAULT_RETRY,
        timeout: Timeout = DEFAULT_TIMEOUT,
        throttle: RetryThrottle | None = RetryThrottle(),  # noqa: B008 -- immutable
        metadata: Sequence[tuple[str, str | bytes]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        clock: Clock = SYSTEM,
    ) -> None:
        """Connect (lazily: channels open on first use).

        Args:
            target: one ``host:port`` for every service (an ingress or proxy
                routing by gRPC service); None dials each service at its own address.
            addresses: per-service addresses, by mesh name (``memory-hub``) or
                proto service (``autoecoops.memory.v1.MemoryService``). An address
                may name several replicas, as a list of ``ip:port`` (or one
                string ``ip:port,ip:port``) or ``dns:///name:port``: calls go
                round robin to the replicas reporting SERVING.
            config: the mesh configuration for defaults; None reads ``AUTOECOOPS_*``.
            credentials: how to get a bearer token; None sends none.
            tls: True, False, ``TLS(...)``, or None for TLS except to loopback.
            allow_insecure_credentials: send credentials without TLS beyond loopback.
            retry: the default policy for idempotent calls (per call: ``retry=``).
            timeout: the default overall deadline of a unary call, attempts included.
            throttle: gRPC retry throttling per server; None disables it.
            metadata: sent with every call.
            channel_options: extra gRPC channel arguments.
            clock: time and randomness (tests pass fakes).
        """
        super().__init__()
        config = config if config is not None else MeshConfig.from_env()
        self._transport = self._transport_type(
            routes=Routes(target, addresses, config),
            config=config,
            credentials=credentials,
            tls=tls,
            allow_insecure_credentials=allow_insecure_credentials,
            retry=retry,
            timeout=timeout,
            throttle=throttle,
            metadata=metadata,
            options=channel_options,
            clock=clock,
        )


class Client(_Connection, Services):
    """A blocking client for every service of the mesh."""

    _transport: SyncTransport
    _transport_type = SyncTransport

    def channel(self, service: str) -> grpc.Channel:
        """The gRPC channel to proto service ``service`` (``package.Service``), for
        a generated stub where the SDK is not wanted; such calls get none of its
        credentials, retries or tracing."""
        return self._transport.channel(service)[0]

    def close(self) -> None:
        """Close the channels; a call waiting to retry gives up."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_Connection, AsyncServices):
    """An asyncio client for every service of the mesh."""

    _transport: AsyncTransport
    _transport_type = AsyncTransport

    def channel(self, service: str) -> grpc.aio.Channel:
        """The grpc.aio channel to proto service ``service`` (``package.Service``),
        for a generated stub where the SDK is not wanted; such calls get none of
        its credentials, retries or tracing."""
        return self._transport.channel(service)[0]

    async def close(self) -> None:
        """Close the channels; a call waiting to retry gives up."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
