"""The one client factory for calls between services.

Every channel it hands out carries three interceptors: OpenTelemetry's, which
injects ``traceparent`` so one trace spans every hop; ``DeadlineInterceptor``,
which gives an outgoing call the *remaining* time of the call being served
(never a fresh budget), and fails fast once that time is gone; and
``CredentialsInterceptor``, which sends the calling service's own token when
the call carries none. A call made on a user's behalf passes the delegated
token (auth's ``on_behalf_of``) in its metadata instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from autoecoops.kernel.mesh.config import (
    DOMAIN_SERVICE,
    MeshConfig,
    channel_options,
    replica_options,
)
from autoecoops.kernel.mesh.descriptors import idempotent_methods, method_info
from autoecoops.kernel.mesh.errors import DeadlineExceeded
from autoecoops.kernel.mesh.interceptors import current_deadline

T = TypeVar("T")


def remaining_timeout(requested: float | None) -> float | None:
    """The timeout for an outgoing call: the smaller of ``requested`` and what
    is left of the current call's deadline. Raises ``DeadlineExceeded`` when
    nothing is left, so no doomed call goes on the wire."""
    deadline = current_deadline.get()
    if deadline is None:
        return requested
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the caller's deadline passed before this call was made")
    return left if requested is None else min(requested, left)


def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    timeout = remaining_timeout(details.timeout)
    if timeout == details.timeout:
        return details
    return grpc.aio.ClientCallDetails(
        details.method, timeout, details.metadata, details.credentials, details.wait_for_ready
    )


class TokenSource(Protocol):
    """Where a service gets its own bearer token."""

    async def token(self) -> str:
        """A valid token ('' when the service has no identity)."""
        ...

    def forget(self, token: str) -> None:
        """``token`` was refused (UNAUTHENTICATED): get a new one for the next call."""
        ...


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    if not token or any(k == "authorization" for k, _ in metadata):
        return details
    metadata.append(("authorization", f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class CredentialsInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the service's own token to calls that carry no authorization."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory

    async def _details(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, str]:
        source = self._factory.token_source
        method: str = (
            details.method.decode() if isinstance(details.method, bytes) else details.method
        )
        info = method_info(method)
        # Public RPCs (JWKS, IssueToken) need no token, and getting one may
        # itself call them.
        if source is None or info is None or info.public:
            return details, ""
        token = await source.token()
        with_token = _with_token(details, token)
        return with_token, token if with_token is not details else ""

    def _watch(self, call: Any, token: str) -> Any:
        """Forget ``token`` if the call is refused as UNAUTHENTICATED: a token minted
        by an auth-service whose keys are gone (a restart on fresh keys, a rotation
        that retired them) is useless until it expires, so the next call mints anew."""
        source = self._factory.token_source
        if token and source is not None:

            async def check(done: Any) -> None:
                with contextlib.suppress(Exception):
                    if await done.code() == grpc.StatusCode.UNAUTHENTICATED:
                        source.forget(token)

            call.add_done_callback(lambda done: asyncio.ensure_future(check(done)))
        return call

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call with the service's token."""
        details, token = await self._details(details)
        return self._watch(await continuation(details, request), token)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call with the service's token."""
        details, token = await self._details(details)
        return self._watch(await continuation(details, request), token)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Client-streaming call with the service's token."""
        details, token = await self._details(details)
        return self._watch(await continuation(details, request_iterator), token)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Bidirectional call with the service's token."""
        details, token = await self._details(details)
        return self._watch(await continuation(details, request_iterator), token)


class DeadlineInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Propagates the served call's remaining deadline to outgoing calls."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call with the propagated deadline."""
        return await continuation(_details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call with the propagated deadline."""
        return await continuation(_details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Client-streaming call with the propagated deadline."""
        return await continuation(_details(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Bidirectional call with the propagated deadline."""
        return await continuation(_details(details), request_iterator)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """``inner``'s server-streaming half, as an interceptor of that kind alone."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Delegate to ``inner``."""
        return await self._inner.intercept_unary_stream(continuation, details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """``inner``'s client-streaming half, as an interceptor of that kind alone."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Delegate to ``inner``."""
        return await self._inner.intercept_stream_unary(continuation, details, request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """``inner``'s bidirectional half, as an interceptor of that kind alone."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Delegate to ``inner``."""
        return await self._inner.intercept_stream_stream(continuation, details, request_iterator)


def every_kind(*interceptors: Any) -> list[Any]:
    """``interceptors`` filed under every call kind they implement.

    grpc.aio files an interceptor object under the first kind it implements
    only (an if/elif in its channel), so one object implementing all four
    would never see a stream: each extra kind gets a delegating adapter.
    """
    out: list[Any] = []
    for i in interceptors:
        out.append(i)
        if isinstance(i, grpc.aio.UnaryUnaryClientInterceptor):
            if isinstance(i, grpc.aio.UnaryStreamClientInterceptor):
                out.append(_UnaryStream(i))
            if isinstance(i, grpc.aio.StreamUnaryClientInterceptor):
                out.append(_StreamUnary(i))
            if isinstance(i, grpc.aio.StreamStreamClientInterceptor):
                out.append(_StreamStream(i))
    return out


def idempotent_methods_of(service: str) -> list[tuple[str, str]]:
    """(proto service, method) of every idempotent RPC mesh service ``service`` serves."""
    return [
        pair
        for domain, served_by in DOMAIN_SERVICE.items()
        if served_by == service
        for pair in idempotent_methods(f"autoecoops.{domain}.v1")
    ]


class ClientFactory:
    """Hands out one pooled channel per target service, with mesh interceptors.

    A service reached at several replicas (``AUTOECOOPS_<SERVICE>_ADDR`` a list
    or a ``dns:`` name) gets a round-robin, health-checked channel whose
    idempotent calls (the contract's flag) are retried on UNAVAILABLE, each
    attempt on the next replica; non-idempotent calls are never retried, so
    one that met a dying replica fails with UNAVAILABLE and the caller decides.
    """

    def __init__(self, config: MeshConfig, token_source: TokenSource | None = None) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: The calling service's identity; set by auth's ``secure`` at start.
        self.token_source = token_source

    def channel(self, service: str) -> grpc.aio.Channel:
        """The shared channel to ``service`` (a name from the port table)."""
        ch = self._channels.get(service)
        if ch is None:
            replicas = (
                replica_options(idempotent_methods_of(service))
                if self._config.replicated(service)
                else []
            )
            ch = grpc.aio.insecure_channel(
                self._config.addr(service),
                # gRPC's reconnect backoff grows to 120 s: after a longer outage a
                # service would find its peer again only that late (the RBAC
                # watch, say). Between services of one mesh, a try a second is
                # cheap, and a peer that comes back is used within about a second
                # (the audit log's recheck waits that long, audit.PROBE_WAIT).
                options=[
                    *channel_options(self._config),
                    ("grpc.initial_reconnect_backoff_ms", 250),
                    ("grpc.min_reconnect_backoff_ms", 250),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                    *replicas,
                ],
                interceptors=[
                    *aio_client_interceptors(),  # type: ignore[no-untyped-call]
                    *every_kind(DeadlineInterceptor(), CredentialsInterceptor(self)),
                ],
            )
            self._channels[service] = ch
        return ch

    def stub(self, stub_type: type[T], service: str) -> T:
        """A generated stub bound to ``service``'s channel."""
        return stub_type(self.channel(service))  # type: ignore[call-arg]

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
