"""The server side of the mesh: one interceptor that authenticates, validates,
times and guards every AutoEcoOps RPC.

It is one interceptor, not a chain of five, because each wrapper in grpc.aio
costs a coroutine per call; the whole per-method plan (option lookup, required
fields, metric series) is resolved once, on the first call of a method.

The error boundary lives here: whatever a handler raises becomes a
google.rpc.Status with details. An unexpected exception is logged with an
error id and reaches the client as INTERNAL with that id, never a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import message as pb_message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

from autoecoops.kernel.mesh import tracing
from autoecoops.kernel.mesh.auth import (
    Authorizer,
    Principal,
    TokenVerifier,
    bearer_token,
    current_principal,
)
from autoecoops.kernel.mesh.descriptors import MethodInfo, field_value, method_info
from autoecoops.kernel.mesh.errors import (
    STATUS_DETAILS_KEY,
    AutoEcoOpsError,
    Internal,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unimplemented,
)
from autoecoops.kernel.mesh.metrics import MethodMetrics
from autoecoops.kernel.mesh.outbox import current_records
from autoecoops.kernel.mesh.redis import redis_unavailable

log = logging.getLogger("autoecoops.mesh")

#: Absolute ``time.monotonic()`` deadline of the call being served, if it has one.
current_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "autoecoops_deadline", default=None
)


def current_trace_id() -> str:
    """The hex trace id of the active span, or '' outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class CallAuditor(Protocol):
    """The audit side of RPCs whose method option says ``audited`` (audit.AuditTrail)."""

    async def begin(self, info: MethodInfo, request: pb_message.Message | None) -> Any:
        """Before the handler: set the call's audit record; raise if it could not be kept."""
        ...

    async def finish(self, info: MethodInfo, ctx: Any) -> int:
        """After the handler: the index of the call's entry once appended."""
        ...

    async def settle(self, info: MethodInfo) -> None:
        """After a call that is not audited: wait for the entries it recorded itself."""
        ...

    async def failed(
        self,
        info: MethodInfo,
        request: pb_message.Message | None,
        ctx: Any,
        error: AutoEcoOpsError,
    ) -> AutoEcoOpsError:
        """The error to answer for an audited call that raised ``error``."""
        ...


class _Call:
    """Per-method plan: what to check before the handler and how to finish."""

    __slots__ = ("audited", "info", "metrics", "pending", "span_attributes")

    def __init__(self, info: MethodInfo, pending: str, audited: bool) -> None:
        self.info = info
        self.metrics = MethodMetrics(info.path)
        self.pending = pending
        self.audited = audited
        service, _, method = info.path.lstrip("/").partition("/")
        self.span_attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


class MeshInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Auth, request validation, metrics and the error boundary for AutoEcoOps RPCs.

    Health, reflection and other non-AutoEcoOps services pass through untouched.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        authorizer: Authorizer | None = None,
        auditor: CallAuditor | None = None,
    ) -> None:
        self._verifier = verifier
        self._authorizer = authorizer
        self._auditor = auditor
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Return the wrapped handler of ``details.method`` (cached per method)."""
        path: str = details.method
        cached = self._handlers.get(path)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or not path.startswith("/autoecoops."):
            # Unknown methods are not cached, so random names cannot grow the map.
            return handler
        info = method_info(path)
        if info is None:
            return handler
        wrapped = self._wrap(info, handler)
        self._handlers[path] = wrapped
        return wrapped

    # -- per call ---------------------------------------------------------

    async def _admit(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Authenticate and authorize; set the principal and deadline context."""
        remaining = context.time_remaining()
        if remaining is not None:
            current_deadline.set(time.monotonic() + remaining)
        info = call.info
        if info.public:
            return
        token = bearer_token(context.invocation_metadata())
        if not token:
            raise Unauthenticated(
                f"{info.full_name} needs a bearer token in the 'authorization' metadata",
                reason="CREDENTIALS_MISSING",
            )
        principal: Principal = await self._verifier.verify(token)
        current_principal.set(principal)
        if not info.permission:
            # Deny by default: an RPC whose contract names no permission is a bug.
            raise PermissionDenied(
                f"{info.full_name} declares no permission and is denied",
                reason="PERMISSION_UNDECLARED",
            )

    async def _authorize(self, call: _Call, request: pb_message.Message | None) -> None:
        """RBAC for the method's permission, in the request's namespace if it names one."""
        info = call.info
        principal = current_principal.get()
        if info.public or principal is None:
            return
        if self._authorizer is None:
            # No RBAC configured means nothing may pass, not everything.
            raise PermissionDenied(
                f"{info.full_name}: no authorizer is configured", reason="RBAC_UNAVAILABLE"
            )
        namespace = (
            field_value(request, info.namespace_field)
            if request is not None and info.namespace_field
            else ""
        )
        await self._authorizer.check(principal, info.permission, namespace)

    @staticmethod
    def _decode(call: _Call, raw: bytes) -> pb_message.Message:
        try:
            request = call.info.request_type.FromString(raw)
        except pb_message.DecodeError:
            raise InvalidArgument(
                f"{call.info.full_name}: the request is not a valid {call.info.request_type.DESCRIPTOR.full_name}",
                reason="MALFORMED_REQUEST",
            ) from None
        violations = call.info.validate(request)
        if violations:
            raise InvalidArgument(
                f"{call.info.full_name}: invalid request: "
                + "; ".join(f"{v.field}: {v.description}" for v in violations),
                reason="INVALID_REQUEST",
                field_violations=violations,
            )
        return request

    async def _decode_stream(
        self, call: _Call, raw: AsyncIterator[bytes]
    ) -> AsyncIterator[pb_message.Message]:
        async for item in raw:
            message = self._decode(call, item)
            if call.info.namespace_field:
                # Each message of a client stream may name its own namespace;
                # RBAC is checked there, before the handler sees the message.
                await self._authorize(call, message)
            yield message

    @staticmethod
    def _as_error(call: _Call, exc: Exception) -> AutoEcoOpsError:
        if isinstance(exc, AutoEcoOpsError):
            return exc
        if isinstance(exc, NotImplementedError):
            what = f": {call.pending}" if call.pending else ""
            return Unimplemented(
                f"{call.info.full_name} is not implemented yet{what}", reason="NOT_IMPLEMENTED_YET"
            )
        unavailable = redis_unavailable(exc)
        if unavailable is not None:
            log.warning("%s: %s", call.info.full_name, unavailable.message)
            return unavailable
        error_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s (error_id=%s)", call.info.full_name, error_id)
        return Internal(
            f"internal error in {call.info.full_name}; quote error_id {error_id}",
            metadata={"error_id": error_id},
        )

    async def _abort(self, call: _Call, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        err = self._as_error(call, exc)
        trace_id = current_trace_id()
        if trace_id and "trace_id" not in err.metadata:
            err.metadata["trace_id"] = trace_id
        status = err.to_status()
        await context.abort(
            err.code,
            err.message,
            trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
        )

    async def _audit_failure(
        self, call: _Call, request: Any, ctx: Any, exc: Exception
    ) -> Exception:
        """The error to answer for an audited call that failed after authentication.

        A call whose change committed answers with ``committed: "true"``; one
        that changed nothing gets a FAILURE/DENIED entry (audit.AuditTrail.failed).
        """
        if not call.audited or self._auditor is None:
            return exc
        if current_principal.get() is None and ctx is None:
            return exc
        err = self._as_error(call, exc)
        try:
            return await self._auditor.failed(call.info, request, ctx, err)
        except Exception:
            log.warning("could not audit the failure of %s", call.info.full_name, exc_info=True)
            return err

    # -- wrapping ---------------------------------------------------------

    def _wrap(self, info: MethodInfo, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        servicer = getattr(behavior, "__self__", None)
        # The method option is the only source: no servicer opts out.
        audited = info.audited and self._auditor is not None
        call = _Call(info, getattr(servicer, "PENDING", ""), audited)
        auditor = self._auditor
        decode: Callable[[_Call, Any], Any] = (
            self._decode_stream if info.client_streaming else self._decode
        )
        admit, authorize, fail, metrics = self._admit, self._authorize, self._abort, call.metrics
        streaming_in, streaming_out = info.client_streaming, info.server_streaming

        async def respond(raw: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any]:
            """The one body of every AutoEcoOps RPC: admit, decode, authorize, run
            the handler, audit, and answer any failure through the error boundary.
            A unary RPC's response is the one item it yields."""
            start, code = time.perf_counter(), "OK"
            request = None
            ctx = None
            # Entries the handler records on its own land here (outbox.current_records).
            records: list[Any] | None = [] if auditor is not None else None
            current_records.set(records)
            with _server_span(call, context) as span:
                try:
                    await admit(call, context)
                    request = decode(call, raw)
                    # A client stream without a namespace field is authorized
                    # cluster-wide when it opens; with one, per message.
                    if not (streaming_in and info.namespace_field):
                        await authorize(call, None if streaming_in else request)
                    if call.audited:
                        # Before anything changes: the record the store commits
                        # with the change (UNAVAILABLE here if the log is down).
                        ctx = await auditor.begin(info, None if streaming_in else request)  # type: ignore[union-attr]
                    result = behavior(request, context)
                    if not streaming_out:
                        if inspect.isawaitable(result):
                            result = await result
                        if ctx is not None:
                            # Synchronous audit: answer once the entry is in the log.
                            index = await auditor.finish(info, ctx)  # type: ignore[union-attr]
                            context.set_trailing_metadata(_audit_trailer(ctx, index))
                        elif records:
                            await auditor.settle(info)  # type: ignore[union-attr]
                        yield result
                        return
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):
                        await result
                    if ctx is not None:
                        # A stream's entry is waited for when it ends (it may run for hours).
                        index = await auditor.finish(info, ctx)  # type: ignore[union-attr]
                        context.set_trailing_metadata(_audit_trailer(ctx, index))
                except grpc.aio.AbortError:
                    code = _code_name(context)
                    raise
                except Exception as exc:
                    exc = await self._audit_failure(
                        call, None if streaming_in else request, ctx, exc
                    )
                    code = _error_code(exc)
                    await fail(call, context, exc)
                finally:
                    metrics.observe(code, time.perf_counter() - start)
                    _end_span(span, code)

        async def respond_once(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            """A unary response: the one item ``respond`` yields."""
            answer = respond(raw, context)
            try:
                return await anext(answer)
            finally:
                # Runs respond's bookkeeping (metrics, span) now, not at GC.
                await answer.aclose()

        # Requests arrive as bytes (no deserializer) so a malformed message is
        # INVALID_ARGUMENT from _decode rather than grpc's opaque INTERNAL.
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(respond_once, None, serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(respond_once, None, serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(respond, None, serializer)
        return grpc.stream_stream_rpc_method_handler(respond, None, serializer)


class _MetadataGetter(Getter[Sequence[tuple[str, str | bytes]]]):
    """Lets the OpenTelemetry propagator read gRPC invocation metadata."""

    def get(self, carrier: Sequence[tuple[str, str | bytes]], key: str) -> list[str] | None:
        found = [v if isinstance(v, str) else v.decode("latin-1") for k, v in carrier if k == key]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, str | bytes]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()
_tracer = trace.get_tracer("autoecoops.mesh")
# Span and trace ids need uniqueness, not secrecy (OTel's own generator is this).
_random = random.Random()


@contextlib.contextmanager
def _server_span(call: _Call, context: grpc.aio.ServicerContext) -> Iterator[trace.Span]:
    # OpenTelemetry's own server instrumentation wraps every call in a second
    # layer and cost a fifth of a bare RPC's throughput; this is the same
    # span (W3C traceparent in, rpc.* attributes) from the layer we already have.
    parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)
    if tracing.recording():
        with _tracer.start_as_current_span(
            call.info.full_name,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=call.span_attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span
        return
    # Nothing records: a non-recording span still carries the trace id (the
    # caller's, or a new one) for errors, audit entries and outgoing calls,
    # at a third of the SDK tracer's cost.
    remote = trace.get_current_span(parent).get_span_context()
    span = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=remote.trace_id if remote.is_valid else _random.getrandbits(128),
            span_id=_random.getrandbits(64),
            is_remote=False,
            trace_flags=remote.trace_flags if remote.is_valid else trace.TraceFlags(0),
            trace_state=remote.trace_state if remote.is_valid else None,
        )
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    finally:
        otel_context.detach(token)


def _audit_trailer(ctx: Any, index: int) -> tuple[tuple[str, str], ...]:
    return (
        ("autoecoops-audit-index", str(index)),
        ("autoecoops-audit-request-id", ctx.request.request_id),
    )


def _end_span(span: trace.Span, code: str) -> None:
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code != "OK":
            span.set_status(trace.StatusCode.ERROR, code)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return str(code.name) if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _error_code(exc: Exception) -> str:
    if isinstance(exc, AutoEcoOpsError):
        return str(exc.code.name)
    if isinstance(exc, NotImplementedError):
        return "UNIMPLEMENTED"
    return "UNAVAILABLE" if redis_unavailable(exc) is not None else "INTERNAL"
