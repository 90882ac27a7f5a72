"""One RPC as a callable: request building, credentials, deadline, retries,
tracing and error conversion, for the sync and the async client.

A method object is built from the contract (``descriptors.method_info``), so
what it does follows the proto: the request and response types, whether the
call needs a token (``public``) and whether it may be retried
(``idempotent``). Unary calls return the response; ``with_call`` returns it
with a ``CallInfo`` (trace id, attempts). Streaming calls return a stream that
carries its trace id, and are never retried: by the time a stream breaks it
may have had effects, and resuming it is the caller's decision.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterable, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import grpc
from google.protobuf import message

from autoecoops.kernel.mesh.descriptors import MethodInfo
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    Cancelled,
    Unauthenticated,
    from_rpc_error,
)
from autoecoops.sdk.credentials import bearer
from autoecoops.sdk.retry import Attempts, Retry
from autoecoops.sdk.tracing import finish, retried, trace_headers, trace_id

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from autoecoops.sdk.credentials import AsyncTokenSource, TokenSource
    from autoecoops.sdk.transport import AsyncTransport, SyncTransport

Req = TypeVar("Req", bound=message.Message)
Resp = TypeVar("Resp", bound=message.Message)


class _Default(enum.Enum):
    DEFAULT = enum.auto()


#: "Use the client's setting" for ``timeout`` and ``retry``.
DEFAULT = _Default.DEFAULT
Timeout = float | timedelta | None
Metadata = Sequence[tuple[str, str | bytes]]
# Span status codes (rpc.grpc.status_code) the client itself decides.
_OK: int = grpc.StatusCode.OK.value[0]
_CANCELLED: int = grpc.StatusCode.CANCELLED.value[0]
_UNKNOWN: int = grpc.StatusCode.UNKNOWN.value[0]


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What happened to a call that returned a response."""

    #: The gRPC path, ``/package.Service/Method``.
    method: str
    #: The trace id, 32 hex digits, as the servers' spans and logs show it.
    trace_id: str
    #: Attempts made, the successful one included.
    attempts: int


class _Method(Generic[Req, Resp]):
    """What the sync and async method objects share."""

    __slots__ = ("_attributes", "_bucket", "_callable", "_name", "_transport", "info")

    def __init__(self, transport: Any, info: MethodInfo) -> None:
        #: The RPC's contract: types, permission, idempotency.
        self.info = info
        self._transport = transport
        service, _, method = info.path[1:].partition("/")
        self._name = info.path[1:]
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        self._callable: Any = None
        self._bucket: Any = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.full_name}>"

    def _request(self, request: Req | None, fields: dict[str, Any]) -> Req:
        if request is None:
            return cast(Req, self.info.request_type(**fields))
        if fields:
            raise TypeError(
                f"{self.info.full_name}: pass a request message or keyword fields, not both"
            )
        if not isinstance(request, self.info.request_type):
            raise TypeError(
                f"{self.info.full_name} takes a {self.info.request_type.DESCRIPTOR.full_name}, "
                f"not a {type(request).__name__}"
            )
        return request

    def _bind(self) -> Any:
        self._callable, self._bucket = self._transport.bind(self.info)
        return self._callable


def _code_of(exc: BaseException) -> int:
    if isinstance(exc, AutoEcoOpsError):
        return int(exc.code.value[0])
    return _CANCELLED if isinstance(exc, asyncio.CancelledError) else _UNKNOWN


@dataclass(frozen=True, slots=True)
class _Send:
    """Step: send one attempt with this timeout and metadata; resume with the
    response, or with the ``grpc.RpcError`` it failed with."""

    timeout: float | None
    metadata: list[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class _Wait:
    """Step: wait ``delay`` seconds before the next attempt (``error`` if cut short)."""

    delay: float
    error: AutoEcoOpsError


class _Token:
    """Step: resume with a bearer token."""


_TOKEN = _Token()
Steps = Generator["_Send | _Wait | _Token", Any, "tuple[Resp, CallInfo]"]


class _UnaryMethod(_Method[Req, Resp]):
    """The one retry loop of unary calls, as steps that a sync or an async
    driver performs, so both clients behave the same by construction."""

    __slots__ = ()

    def _steps(
        self,
        timeout: Timeout | _Default,
        retry: Retry | _Default | None,
        metadata: Metadata,
    ) -> Steps[Resp]:
        t = self._transport
        span = t.tracer.start(self._name, self._attributes)
        tid = trace_id(span)
        headers = [*t.metadata, *metadata, *trace_headers(span)]
        attempts = Attempts(
            t.policy(retry), self.info.idempotent, t.deadline(timeout), self._bucket, t.clock
        )
        tokens = not self.info.public and t.tokens is not None
        renewed = ended = False
        try:
            while True:
                token: str = (yield _TOKEN) if tokens else ""
                send = _Send(attempts.start(), [*headers, bearer(token)] if token else headers)
                outcome = yield send
                if not isinstance(outcome, grpc.RpcError):
                    attempts.succeeded()
                    ended = True
                    finish(span, _OK)
                    return cast(Resp, outcome), CallInfo(self.info.path, tid, attempts.count)
                error = from_rpc_error(outcome, tid)
                if (
                    tokens
                    and not renewed
                    and isinstance(error, Unauthenticated)
                    and t.tokens.invalidate(token)
                ):
                    # The token was rejected (revoked, clock skew): one more
                    # attempt with a fresh one.
                    renewed = True
                    continue
                delay = attempts.failed(error)
                if delay is None:
                    ended = True
                    finish(span, _code_of(error), error.message)
                    raise error from outcome
                retried(span, attempts.count, error.code.name, delay)
                yield _Wait(delay, error)
        except asyncio.CancelledError:
            try:
                task = asyncio.current_task()
            except RuntimeError:  # a sync caller: no event loop
                task = None
            if t.closed and not ended and task is not None and not task.cancelling():
                # The channel was closed under the call, not the caller's task
                # cancelled: report it as the call's outcome, like any other.
                closed = Cancelled("the client was closed during the call", trace_id=tid)
                finish(span, _CANCELLED, closed.message)
                raise closed from None
            if not ended:
                finish(span, _CANCELLED, "cancelled")
            raise
        except BaseException as exc:
            if not ended:
                finish(span, _code_of(exc), str(exc))
            raise


class UnaryMethod(_UnaryMethod[Req, Resp]):
    """A unary RPC of a sync client."""

    __slots__ = ()
    _transport: SyncTransport

    def __call__(
        self,
        request: Req | None = None,
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,
        retry: Retry | _Default | None = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> Resp:
        """Call the RPC with ``request`` or a request built from ``fields``."""
        return self._invoke(self._request(request, fields), timeout, retry, metadata)[0]

    def with_call(
        self,
        request: Req | None = None,
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,
        retry: Retry | _Default | None = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> tuple[Resp, CallInfo]:
        """Like calling it, and also return the call's ``CallInfo``."""
        return self._invoke(self._request(request, fields), timeout, retry, metadata)

    def _invoke(
        self,
        request: Req,
        timeout: Timeout | _Default,
        retry: Retry | _Default | None,
        metadata: Metadata,
    ) -> tuple[Resp, CallInfo]:
        t = self._transport
        call = self._callable or self._bind()
        steps = self._steps(timeout, retry, metadata)
        value: Any = None
        failure: BaseException | None = None
        while True:
            try:
                step = steps.throw(failure) if failure is not None else steps.send(value)
            except StopIteration as done:
                return cast("tuple[Resp, CallInfo]", done.value)
            value, failure = None, None
            try:
                if isinstance(step, _Send):
                    try:
                        value = call(request, timeout=step.timeout, metadata=step.metadata)
                    except grpc.RpcError as exc:
                        value = exc
                elif isinstance(step, _Wait):
                    t.sleep(step.delay, step.error)
                else:
                    value = self._token(t.tokens)
            except BaseException as exc:
                failure = exc

    def _token(self, tokens: TokenSource | None) -> str:
        assert tokens is not None
        try:
            return tokens.token()
        except AutoEcoOpsError as error:
            error.add_note(f"while getting a token for {self.info.full_name}")
            raise


class AsyncUnaryMethod(_UnaryMethod[Req, Resp]):
    """A unary RPC of an async client."""

    __slots__ = ()
    _transport: AsyncTransport

    async def __call__(
        self,
        request: Req | None = None,
        /,
        *,
        # The gRPC deadline, sent to the server: not an asyncio.timeout's job.
        timeout: Timeout | _Default = DEFAULT,  # noqa: ASYNC109
        retry: Retry | _Default | None = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> Resp:
        """Call the RPC with ``request`` or a request built from ``fields``."""
        return (await self._invoke(self._request(request, fields), timeout, retry, metadata))[0]

    async def with_call(
        self,
        request: Req | None = None,
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,  # noqa: ASYNC109
        retry: Retry | _Default | None = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> tuple[Resp, CallInfo]:
        """Like calling it, and also return the call's ``CallInfo``."""
        return await self._invoke(self._request(request, fields), timeout, retry, metadata)

    async def _invoke(
        self,
        request: Req,
        timeout: Timeout | _Default,  # noqa: ASYNC109
        retry: Retry | _Default | None,
        metadata: Metadata,
    ) -> tuple[Resp, CallInfo]:
        t = self._transport
        call = self._callable or self._bind()
        steps = self._steps(timeout, retry, metadata)
        value: Any = None
        failure: BaseException | None = None
        while True:
            try:
                step = steps.throw(failure) if failure is not None else steps.send(value)
            except StopIteration as done:
                return cast("tuple[Resp, CallInfo]", done.value)
            value, failure = None, None
            try:
                if isinstance(step, _Send):
                    try:
                        value = await call(request, timeout=step.timeout, metadata=step.metadata)
                    except grpc.RpcError as exc:
                        value = exc
                elif isinstance(step, _Wait):
                    await t.sleep(step.delay, step.error)
                else:
                    value = await self._token(t.tokens)
            except BaseException as exc:
                failure = exc

    async def _token(self, tokens: AsyncTokenSource | None) -> str:
        assert tokens is not None
        try:
            return await tokens.token()
        except AutoEcoOpsError as error:
            error.add_note(f"while getting a token for {self.info.full_name}")
            raise


class _StreamBase(Generic[Resp]):
    """What the sync and async streams share: the call, its span and trace id."""

    __slots__ = ("_call", "_span", "method", "trace_id")

    def __init__(self, call: Any, span: Span, method: str) -> None:
        self._call = call
        self._span: Span | None = span
        #: The gRPC path of the call.
        self.method = method
        #: The trace id of the call, 32 hex digits.
        self.trace_id = trace_id(span)

    def _end(self, code: int, message: str = "") -> None:
        span, self._span = self._span, None
        if span is not None:
            finish(span, code, message)

    def _error(self, exc: grpc.RpcError) -> AutoEcoOpsError:
        error = from_rpc_error(exc, self.trace_id)
        self._end(_code_of(error), error.message)
        return error

    def cancel(self) -> None:
        """Stop the stream; further reads raise ``Cancelled``."""
        self._call.cancel()
        self._end(_CANCELLED, "cancelled by the client")


class Stream(_StreamBase[Resp]):
    """The responses of a streaming call (sync): iterate it; cancel it or use
    it as a context manager to stop early."""

    __slots__ = ()

    def __iter__(self) -> Stream[Resp]:
        return self

    def __next__(self) -> Resp:
        try:
            return cast(Resp, next(self._call))
        except StopIteration:
            self._end(_OK)
            raise
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def __enter__(self) -> Stream[Resp]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._span is not None:
            self.cancel()


class AsyncStream(_StreamBase[Resp]):
    """The responses of a streaming call (async): ``async for`` over it; cancel
    it or use it as an async context manager to stop early. A bidirectional
    call opened without a request iterable takes requests with ``write``."""

    __slots__ = ()

    def __aiter__(self) -> AsyncStream[Resp]:
        return self

    async def __anext__(self) -> Resp:
        try:
            response = await self._call.read()
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        except asyncio.CancelledError:
            self._end(_CANCELLED, "cancelled")
            raise
        if response is grpc.aio.EOF:
            self._end(_OK)
            raise StopAsyncIteration
        return cast(Resp, response)

    async def write(self, request: message.Message) -> None:
        """Send one request on a bidirectional call opened without an iterable."""
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    async def done_writing(self) -> None:
        """Tell the server no more requests follow."""
        await self._call.done_writing()

    async def __aenter__(self) -> AsyncStream[Resp]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._span is not None:
            self.cancel()


class _StreamMethod(_Method[Req, Resp]):
    """Request handling of streaming RPCs."""

    __slots__ = ()

    def _requests(self, request: Any, fields: dict[str, Any]) -> Any:
        if self.info.client_streaming:
            if fields:
                raise TypeError(
                    f"{self.info.full_name} is client-streaming: pass an iterable of "
                    f"{self.info.request_type.DESCRIPTOR.full_name}, not keyword fields"
                )
            return request
        return self._request(request, fields)

    def _open(self, transport: Any, metadata: Metadata) -> tuple[Span, list[tuple[str, Any]]]:
        span = transport.tracer.start(self._name, self._attributes)
        return span, [*transport.metadata, *metadata, *trace_headers(span)]


class StreamMethod(_StreamMethod[Req, Resp]):
    """A streaming RPC of a sync client: server-streaming and bidirectional
    calls return a ``Stream``; client-streaming calls return the response."""

    __slots__ = ()
    _transport: SyncTransport

    def __call__(
        self,
        request: Any = None,
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> Any:
        """Open the stream with a request (or fields), or an iterable of requests."""
        result, _ = self._open_call(self._requests(request, fields), timeout, metadata)
        return result

    def with_call(
        self,
        requests: Iterable[Req],
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,
        metadata: Metadata = (),
    ) -> tuple[Resp, CallInfo]:
        """For a client-streaming RPC: the response and the call's ``CallInfo``."""
        if not self.info.client_streaming or self.info.server_streaming:
            raise TypeError(f"{self.info.full_name}: with_call is for client-streaming calls")
        response, span = self._open_call(requests, timeout, metadata)
        return response, CallInfo(self.info.path, trace_id(span), 1)

    def _open_call(self, request: Any, timeout: Timeout | _Default, metadata: Metadata) -> Any:
        t = self._transport
        call = self._callable or self._bind()
        span, headers = self._open(t, metadata)
        try:
            if not self.info.public and t.tokens is not None:
                headers.append(bearer(t.tokens.token()))
            deadline = t.deadline(timeout, streaming=True)
            attempt_timeout = None if deadline is None else deadline - t.clock.monotonic()
            if self.info.client_streaming:
                request = iter(request)
            result = call(request, timeout=attempt_timeout, metadata=headers)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, trace_id(span))
            finish(span, _code_of(error), error.message)
            raise error from exc
        except BaseException as exc:
            finish(span, _code_of(exc), str(exc))
            raise
        if self.info.server_streaming:
            return Stream[Resp](result, span, self.info.path), span
        finish(span, _OK)
        return result, span


class AsyncStreamMethod(_StreamMethod[Req, Resp]):
    """A streaming RPC of an async client: server-streaming and bidirectional
    calls return an ``AsyncStream``; client-streaming calls are awaited for
    the response."""

    __slots__ = ()
    _transport: AsyncTransport

    def __call__(
        self,
        request: Any = None,
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,
        metadata: Metadata = (),
        **fields: Any,
    ) -> Any:
        """Open the stream with a request (or fields), or an (async) iterable of requests.

        Server-streaming and bidirectional calls return the stream directly
        (``async for`` over it); a client-streaming call returns an awaitable.
        """
        requests = self._requests(request, fields)
        if self.info.server_streaming:
            return self._open_stream(requests, timeout, metadata)
        return self._unary_response(requests, timeout, metadata)

    async def with_call(
        self,
        requests: Iterable[Req] | AsyncIterable[Req],
        /,
        *,
        timeout: Timeout | _Default = DEFAULT,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> tuple[Resp, CallInfo]:
        """For a client-streaming RPC: the response and the call's ``CallInfo``."""
        if not self.info.client_streaming or self.info.server_streaming:
            raise TypeError(f"{self.info.full_name}: with_call is for client-streaming calls")
        response, info = await self._unary_response(requests, timeout, metadata, with_call=True)
        return cast(Resp, response), info

    def _open_stream(
        self, request: Any, timeout: Timeout | _Default, metadata: Metadata
    ) -> AsyncStream[Resp]:
        span, headers = self._open(self._transport, metadata)
        return _LazyAsyncStream(self, span, headers, request, timeout)

    async def _start(
        self, span: Span, headers: list[tuple[str, Any]], request: Any, budget: Timeout | _Default
    ) -> Any:
        t = self._transport
        call = self._callable or self._bind()
        try:
            if not self.info.public and t.tokens is not None:
                headers.append(bearer(await t.tokens.token()))
            deadline = t.deadline(budget, streaming=True)
            attempt_timeout = None if deadline is None else deadline - t.clock.monotonic()
            return call(request, timeout=attempt_timeout, metadata=headers)
        except BaseException as exc:
            finish(span, _code_of(exc), str(exc))
            raise

    async def _unary_response(
        self,
        requests: Any,
        budget: Timeout | _Default,
        metadata: Metadata,
        with_call: bool = False,
    ) -> Any:
        span, headers = self._open(self._transport, metadata)
        call = await self._start(span, headers, requests, budget)
        try:
            response = await call
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, trace_id(span))
            finish(span, _code_of(error), error.message)
            raise error from exc
        except BaseException as exc:
            finish(span, _code_of(exc), str(exc))
            raise
        finish(span, _OK)
        return (response, CallInfo(self.info.path, trace_id(span), 1)) if with_call else response


class _LazyAsyncStream(AsyncStream[Resp]):
    """An AsyncStream whose call starts on first use, so opening it needs no
    ``await`` (the token may have to be fetched first). Its span, and so its
    trace id, exist from the start."""

    __slots__ = ("_headers", "_method", "_request", "_timeout")

    def __init__(
        self,
        method: AsyncStreamMethod[Any, Resp],
        span: Span,
        headers: list[tuple[str, Any]],
        request: Any,
        timeout: Timeout | _Default,
    ) -> None:
        super().__init__(None, span, method.info.path)
        self._method = method
        self._headers = headers
        self._request = request
        self._timeout = timeout

    async def _ensure(self) -> None:
        if self._call is None:
            if self._span is None:
                raise Cancelled("the stream was cancelled before it started")
            self._call = await self._method._start(
                self._span, self._headers, self._request, self._timeout
            )

    async def __anext__(self) -> Resp:
        await self._ensure()
        return await super().__anext__()

    async def write(self, request: message.Message) -> None:
        """Send one request on a bidirectional call opened without an iterable."""
        await self._ensure()
        await super().write(request)

    async def done_writing(self) -> None:
        """Tell the server no more requests follow."""
        await self._ensure()
        await super().done_writing()

    async def __aenter__(self) -> AsyncStream[Resp]:
        await self._ensure()
        return self

    def cancel(self) -> None:
        """Stop the stream; further reads raise ``Cancelled``."""
        if self._call is not None:
            self._call.cancel()
        self._end(_CANCELLED, "cancelled by the client")
