"""What one client holds: its channels, token source, defaults and throttles.

``SyncTransport`` and ``AsyncTransport`` differ only in the gRPC channel
flavour, the token source and how a retry waits; the settings, the address
book and the security rules are shared.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import message

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.descriptors import MethodInfo, method_info
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, Cancelled
from autoecoops.sdk.calls import DEFAULT, AsyncUnaryMethod, Timeout, UnaryMethod, _Default
from autoecoops.sdk.channels import TLS, Routes, channel_options, check_credentials, tls_for
from autoecoops.sdk.clock import Clock
from autoecoops.sdk.credentials import AsyncTokenSource, Credentials, TokenSource
from autoecoops.sdk.retry import NO_RETRY, Retry, RetryThrottle, TokenBucket
from autoecoops.sdk.tracing import CallTracer

#: How long a token request may take when the call needing it sets no deadline.
TOKEN_TIMEOUT = 10.0


def seconds(timeout: Timeout) -> float | None:
    """A timeout as seconds (None: no deadline)."""
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    return None if timeout is None else float(timeout)


class _Transport:
    """The settings and address book of one client."""

    def __init__(
        self,
        *,
        routes: Routes,
        config: MeshConfig,
        credentials: Credentials | None,
        tls: bool | TLS | None,
        allow_insecure_credentials: bool,
        retry: Retry,
        timeout: Timeout,
        throttle: RetryThrottle | None,
        metadata: Sequence[tuple[str, str | bytes]],
        options: Sequence[tuple[str, Any]],
        clock: Clock,
    ) -> None:
        self.routes = routes
        self.config = config
        self.credentials = credentials
        #: The client's default policy for idempotent calls.
        self.retry = retry
        #: The client's default overall deadline of a unary call, in seconds.
        self.timeout = seconds(timeout)
        self.metadata: tuple[tuple[str, str | bytes], ...] = tuple(metadata)
        self.clock = clock
        self.tracer = CallTracer()
        self._tls = tls
        self._allow_insecure = allow_insecure_credentials
        self._throttle = throttle
        self._options = tuple(options)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def policy(self, retry: Retry | _Default | None) -> Retry:
        """The retry policy of one call: its own, or the client's."""
        if retry is DEFAULT:
            return self.retry
        return NO_RETRY if retry is None else retry  # type: ignore[return-value]

    def deadline(self, timeout: Timeout | _Default, streaming: bool = False) -> float | None:
        """The call's absolute deadline on the monotonic clock (None: none).

        Streams have none unless asked: a subscription is meant to last.
        """
        if timeout is DEFAULT:
            if streaming:
                return None
            budget = self.timeout
        else:
            budget = seconds(timeout)  # type: ignore[arg-type]
        return None if budget is None else self.clock.monotonic() + budget

    def _target(self, service: str) -> tuple[str, TLS | None, list[tuple[str, Any]]]:
        address = self.routes.address(service)
        tls = tls_for(address, self._tls)
        if self.credentials is not None:
            check_credentials(address, tls, self._allow_insecure)
        return address, tls, channel_options(self.config, tls, self._options, address)

    def _bucket(self, address: str) -> TokenBucket | None:
        if self._throttle is None:
            return None
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets.setdefault(address, self._throttle.bucket())
        return bucket


def _service_of(info: MethodInfo) -> str:
    return info.path[1:].partition("/")[0]


def _callable(channel: Any, info: MethodInfo) -> Any:
    kind = (
        ("stream_stream" if info.server_streaming else "stream_unary")
        if info.client_streaming
        else ("unary_stream" if info.server_streaming else "unary_unary")
    )
    return getattr(channel, kind)(
        info.path,
        request_serializer=info.request_type.SerializeToString,
        response_deserializer=info.response_type.FromString,
        _registered_method=True,
    )


class SyncTransport(_Transport):
    """The transport of a sync ``Client``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._channels: dict[str, grpc.Channel] = {}
        self._closed = threading.Event()
        self._auth_calls: dict[str, UnaryMethod[Any, Any]] = {}
        #: The token source; None without credentials.
        self.tokens = (
            TokenSource(self.credentials, self._auth_call, self.clock)
            if self.credentials is not None
            else None
        )

    def channel(self, service: str) -> tuple[grpc.Channel, str]:
        """The channel to proto service ``service`` (shared by services at one address)."""
        address, tls, options = self._target(service)
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                if self._closed.is_set():
                    raise Cancelled("the client is closed")
                channel = (
                    grpc.secure_channel(address, tls.channel_credentials(), options)
                    if tls is not None
                    else grpc.insecure_channel(address, options)
                )
                self._channels[address] = channel
        return channel, address

    def bind(self, info: MethodInfo) -> tuple[Any, TokenBucket | None]:
        """The multi-callable of ``info`` on its service's channel, and that server's throttle."""
        channel, address = self.channel(_service_of(info))
        return _callable(channel, info), self._bucket(address)

    def async_channel(self, service: str) -> grpc.aio.Channel:
        """A new grpc.aio channel to ``service`` with this client's settings; the
        caller closes it (for asyncio helpers such as the event consumer)."""
        address, tls, options = self._target(service)
        if tls is not None:
            return grpc.aio.secure_channel(address, tls.channel_credentials(), options)
        return grpc.aio.insecure_channel(address, options)

    def _auth_call(self, path: str, request: message.Message) -> Any:
        method = self._auth_calls.get(path)
        if method is None:
            info = method_info(path)
            assert info is not None, path
            method = self._auth_calls.setdefault(path, UnaryMethod(self, info))
        return method(request, timeout=TOKEN_TIMEOUT)

    def sleep(self, delay: float, error: AutoEcoOpsError) -> None:
        """Wait ``delay`` seconds before a retry; closing the client ends the wait."""
        if self.clock.sleep is not None:
            self.clock.sleep(delay)
        elif self._closed.wait(delay):
            error.add_note("the client was closed while waiting to retry")
            raise error

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed.is_set()

    def close(self) -> None:
        """Close every channel and end any wait for a retry."""
        self._closed.set()
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class AsyncTransport(_Transport):
    """The transport of an ``AsyncClient``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closed = False
        self._closing: asyncio.Event | None = None
        self._auth_calls: dict[str, AsyncUnaryMethod[Any, Any]] = {}
        #: The token source; None without credentials.
        self.tokens = (
            AsyncTokenSource(self.credentials, self._auth_call, self.clock)
            if self.credentials is not None
            else None
        )

    def channel(self, service: str) -> tuple[grpc.aio.Channel, str]:
        """The channel to proto service ``service`` (shared by services at one address)."""
        address, tls, options = self._target(service)
        channel = self._channels.get(address)
        if channel is None:
            if self._closed:
                raise Cancelled("the client is closed")
            channel = (
                grpc.aio.secure_channel(address, tls.channel_credentials(), options)
                if tls is not None
                else grpc.aio.insecure_channel(address, options)
            )
            self._channels[address] = channel
        return channel, address

    def bind(self, info: MethodInfo) -> tuple[Any, TokenBucket | None]:
        """The multi-callable of ``info`` on its service's channel, and that server's throttle."""
        channel, address = self.channel(_service_of(info))
        return _callable(channel, info), self._bucket(address)

    async def _auth_call(self, path: str, request: message.Message) -> Any:
        method = self._auth_calls.get(path)
        if method is None:
            info = method_info(path)
            assert info is not None, path
            method = self._auth_calls.setdefault(path, AsyncUnaryMethod(self, info))
        return await method(request, timeout=TOKEN_TIMEOUT)

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    async def sleep(self, delay: float, error: AutoEcoOpsError) -> None:
        """Wait ``delay`` seconds before a retry; closing the client ends the wait."""
        if self._closing is None:
            self._closing = asyncio.Event()
        wait = asyncio.ensure_future((self.clock.async_sleep or asyncio.sleep)(delay))
        stop = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((wait, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            wait.cancel()
            stop.cancel()
        if self._closed:
            error.add_note("the client was closed while waiting to retry")
            raise error

    async def close(self) -> None:
        """Close every channel and end any wait for a retry."""
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
