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

import time
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from autoecoops.kernel.mesh.config import MeshConfig, channel_options
from autoecoops.kernel.mesh.descriptors import method_info
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

    async def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        source = self._factory.token_source
        method: str = (
            details.method.decode() if isinstance(details.method, bytes) else details.method
        )
        info = method_info(method)
        # Public RPCs (JWKS, IssueToken) need no token, and getting one may
        # itself call them.
        if source is None or info is None or info.public:
            return details
        return _with_token(details, await source.token())

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Unary call with the service's token."""
        return await continuation(await self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Server-streaming call with the service's token."""
        return await continuation(await self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Client-streaming call with the service's token."""
        return await continuation(await self._details(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        """Bidirectional call with the service's token."""
        return await continuation(await self._details(details), request_iterator)


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


class ClientFactory:
    """Hands out one pooled channel per target service, with mesh interceptors."""

    def __init__(self, config: MeshConfig, token_source: TokenSource | None = None) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: The calling service's identity; set by auth's ``secure`` at start.
        self.token_source = token_source

    def channel(self, service: str) -> grpc.aio.Channel:
        """The shared channel to ``service`` (a name from the port table)."""
        ch = self._channels.get(service)
        if ch is None:
            ch = grpc.aio.insecure_channel(
                self._config.addr(service),
                options=channel_options(self._config),
                interceptors=[
                    *aio_client_interceptors(),  # type: ignore[no-untyped-call]
                    DeadlineInterceptor(),
                    CredentialsInterceptor(self),
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
