"""The REST gateway as an ASGI application: HTTP/JSON in, gRPC to the mesh, JSON out.

Every request goes the same way, with no per-route code: the router finds the
binding from the ``google.api.http`` rules; the body, path values and query
parameters fill the request message (all problems are collected into one 400
before any backend call); headers become metadata and the deadline; the RPC
runs on the backend's pooled channel; the response, or the google.rpc.Status of
the failure, goes back as JSON with grpc-gateway's HTTP status table.
Server streams answer newline-delimited JSON, or Server-Sent Events when the
client accepts ``text/event-stream``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter

from autoecoops.gateway.backends import SERVING, Backends
from autoecoops.gateway.codec import BodyError, Decoder, dumps, load_json, message_to_json
from autoecoops.gateway.router import Match, MethodNotAllowed, NoRoute, Router
from autoecoops.gateway.rules import Binding
from autoecoops.gateway.settings import GatewaySettings
from autoecoops.gateway.status import code_of, from_rpc_error, http_status, status_json
from autoecoops.gateway.templates import PathDecodeError
from autoecoops.gateway.webui import WebUI
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger("autoecoops.gateway")
tracer = trace.get_tracer("autoecoops.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

#: Request headers a CORS preflight may ask for (plus any ``Grpc-Metadata-*``).
CORS_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "accept",
        "grpc-timeout",
        "x-request-timeout",
        "traceparent",
        "tracestate",
    }
)
#: Metadata keys a client may not set through ``Grpc-Metadata-*``: HTTP/2 and
#: gRPC transport headers, and the ones the gateway sets itself.
RESERVED_METADATA = frozenset(
    {
        "content-type",
        "content-length",
        "te",
        "host",
        "connection",
        "user-agent",
        "x-forwarded-for",
        "x-forwarded-host",
        "traceparent",
        "tracestate",
    }
)
_METADATA_KEY = re.compile(r"^[0-9a-z_.\-]+$")
_PRINTABLE = re.compile(rb"^[\x20-\x7e]*$")
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_SECONDS = re.compile(r"^\d{1,9}(\.\d{1,9})?$")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_JSON = (b"content-type", b"application/json")


class _MetadataSetter(Setter[list[tuple[str, str | bytes]]]):
    """Lets the OpenTelemetry propagator write into a gRPC metadata list."""

    def set(self, carrier: list[tuple[str, str | bytes]], key: str, value: str) -> None:
        carrier.append((key, value))


_METADATA_SETTER = _MetadataSetter()


class HttpError(Exception):
    """A response that is a google.rpc.Status: from a backend or from the gateway."""

    def __init__(
        self,
        status: status_pb2.Status | AutoEcoOpsError,
        http: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        self.status = status if isinstance(status, status_pb2.Status) else status.to_status()
        super().__init__(self.status.message)
        self.http = http or http_status(self.status)
        self.headers = headers or []


@dataclass(slots=True)
class _Request:
    scope: Scope
    receive: Receive
    method: str
    headers: dict[bytes, bytes]
    raw_headers: Headers
    #: CORS headers for the response, decided from the Origin once.
    cors: Headers = field(default_factory=list)
    started: bool = False


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a binding needs per request, resolved once."""

    binding: Binding
    call: Any
    request_type: type[Message]
    bound: tuple[str, ...]
    response_key: str


class Gateway:
    """The ASGI application; ``server.start_gateway`` serves it with uvicorn."""

    def __init__(
        self,
        router: Router,
        backends: Backends,
        settings: GatewaySettings,
        document: dict[str, Any],
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self.router = router
        self.backends = backends
        self.settings = settings
        self.document = document
        self._pool = pool
        self._decoder = Decoder(pool)
        self._plans: dict[int, _Plan] = {}
        self._openapi_json = dumps(document)
        self._openapi_yaml: bytes | None = None
        self._origins = frozenset(settings.cors_origins)
        self._fixed: dict[str, Callable[[_Request, Send], Awaitable[None]]] = {
            "/healthz": self._healthz,
            "/openapi.json": self._openapi,
            "/openapi.yaml": self._openapi,
        }
        self._webui = WebUI()

    # -- ASGI ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (other ASGI scopes are ignored)."""
        if scope["type"] != "http":
            return
        raw = scope["headers"]
        req = _Request(scope, receive, scope["method"], dict(raw), raw)
        try:
            req.cors = self._cors(req)
            await self._dispatch(req, send)
        except HttpError as err:
            if req.started:
                log.warning("error after the response started: %s", err)
                return
            await self._send_error(req, send, err)
        except Exception:
            if req.started:
                log.exception("error while streaming a response")
                return
            error_id = uuid.uuid4().hex[:12]
            log.exception("unhandled gateway error (error_id=%s)", error_id)
            await self._send_error(
                req,
                send,
                HttpError(
                    Internal(
                        f"internal gateway error; quote error_id {error_id}",
                        metadata={"error_id": error_id},
                    )
                ),
            )

    async def _dispatch(self, req: _Request, send: Send) -> None:
        scope = req.scope
        path: str = scope["path"]
        if WebUI.serves(path):
            await self._webui_file(req, send, path)
            return
        fixed = self._fixed.get(path)
        if fixed is not None:
            if req.method == "OPTIONS" and req.cors:
                await self._preflight(req, send, ["GET"])
                return
            if req.method != "GET":
                raise self._not_allowed(req.method, path, ["GET"])
            await fixed(req, send)
            return
        raw_bytes: bytes = scope.get("raw_path") or path.encode("utf-8")
        try:
            raw = raw_bytes.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(
                InvalidArgument("the request path must be ASCII (percent-encode the rest)")
            ) from None
        if req.method == "OPTIONS" and req.cors and b"access-control-request-method" in req.headers:
            await self._preflight(req, send, self.router.allowed(raw))
            return
        try:
            match = self.router.match(req.method, raw)
        except NoRoute:
            raise HttpError(
                NotFound(f"no API at {req.method} {path}", reason="NO_ROUTE", resource_name=path)
            ) from None
        except MethodNotAllowed as err:
            raise self._not_allowed(req.method, path, err.allowed) from None
        except PathDecodeError as err:
            raise HttpError(
                InvalidArgument(
                    str(err),
                    reason="INVALID_PATH",
                    field_violations=[FieldViolation(err.field, "not valid UTF-8 once decoded")],
                )
            ) from None
        await self._rpc(req, send, match)

    # -- one RPC ------------------------------------------------------------

    def _plan(self, binding: Binding) -> _Plan:
        plan = self._plans.get(id(binding))
        if plan is None:
            field = binding.response_field
            plan = _Plan(
                binding=binding,
                call=self.backends.callable_for(binding),
                request_type=message_factory.GetMessageClass(binding.method.input_type),
                bound=binding.bound_paths(),
                response_key=field.json_name if field is not None else "",
            )
            self._plans[id(binding)] = plan
        return plan

    async def _rpc(self, req: _Request, send: Send, match: Match) -> None:
        binding = match.binding
        plan = self._plan(binding)
        timeout = self._timeout(req, streaming=binding.server_streaming)
        # The budget runs from the request's arrival, so reading and checking
        # the body spends it too; a deadline spent before the call (a zero or
        # one-nanosecond Grpc-Timeout) is 504 every time, never a lucky 200.
        deadline = None if timeout is None else time.monotonic() + timeout
        metadata = self._metadata(req)
        if binding.client_streaming:
            request: Any = iter(await self._stream_requests(req, plan, match.values))
        else:
            request = await self._request(req, plan, match.values)
        carrier = {
            name: req.headers[key].decode("latin-1")
            for name, key in (("traceparent", b"traceparent"), ("tracestate", b"tracestate"))
            if key in req.headers
        }
        with tracer.start_as_current_span(
            f"{binding.http_method} {binding.template.source}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": req.method, "http.route": binding.template.source},
        ):
            # traceparent/tracestate of the gateway's span: the backend's span is its child.
            propagate.inject(metadata, setter=_METADATA_SETTER)
            timeout = _left(deadline)
            if binding.server_streaming:
                await self._stream(req, send, plan, request, metadata, timeout)
                return
            call = plan.call(request, metadata=metadata, timeout=timeout)
            try:
                response = await call
                initial = await call.initial_metadata()
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError as err:
                raise self._backend_error(req, binding, err) from None
        body = dumps(self._render(plan, response))
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        headers += _metadata_headers(b"grpc-metadata-", initial)
        headers += _metadata_headers(b"grpc-trailer-", trailing)
        await self._send(req, send, 200, headers, body)

    def _render(self, plan: _Plan, response: Message) -> Any:
        value = message_to_json(response, self._pool)
        if plan.response_key:
            return value.get(plan.response_key)
        return value

    async def _request(self, req: _Request, plan: _Plan, values: dict[str, str]) -> Message:
        binding = plan.binding
        msg = plan.request_type()
        out: list[FieldViolation] = []
        if binding.body:
            body = await self._read_body(req)
            value = _load(body, binding.body) if body.strip() else None
            if binding.body == "*":
                self._decoder.merge_message({} if value is None else value, msg, "", out)
            else:
                field = binding.body_field
                assert field is not None
                self._decoder.merge_field(field, value, msg, field.name, out)
        self._path_values(msg, binding, values, out)
        if binding.body != "*":
            query = self._query(req)
            if query:
                self._decoder.merge_query(msg, query, plan.bound, out)
        if out:
            raise _invalid(out)
        return msg

    async def _stream_requests(
        self, req: _Request, plan: _Plan, values: dict[str, str]
    ) -> list[Message]:
        """A client stream: the NDJSON body, one request per line, all checked first."""
        binding = plan.binding
        body = await self._read_body(req)
        messages: list[Message] = []
        out: list[FieldViolation] = []
        bad_json = False
        for number, line in enumerate(body.split(b"\n"), start=1):
            if not line.strip():
                continue
            msg = plan.request_type()
            found: list[FieldViolation] = []
            try:
                value = load_json(line)
            except BodyError as err:
                # Keep going: the client learns of every bad line at once.
                out.append(FieldViolation("", f"line {number}: {err}"))
                bad_json = True
                continue
            if binding.body == "*":
                self._decoder.merge_message(value, msg, "", found)
            else:
                field = binding.body_field
                assert field is not None
                self._decoder.merge_field(field, value, msg, field.name, found)
            self._path_values(msg, binding, values, found)
            out += [FieldViolation(v.field, f"line {number}: {v.description}") for v in found]
            messages.append(msg)
        if out:
            raise _invalid(out, "INVALID_JSON" if bad_json else "INVALID_REQUEST")
        return messages

    def _path_values(
        self, msg: Message, binding: Binding, values: dict[str, str], out: list[FieldViolation]
    ) -> None:
        for pf in binding.path_fields:
            self._decoder.set_text(msg, pf.chain, [values[pf.dotted]], pf.dotted, out)

    def _query(self, req: _Request) -> list[tuple[str, str]]:
        qs: bytes = req.scope.get("query_string", b"")
        if not qs:
            return []
        try:
            return parse_qsl(
                qs.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict"
            )
        except UnicodeDecodeError:
            raise HttpError(
                InvalidArgument("the query string is not valid UTF-8", reason="INVALID_UTF8")
            ) from None

    async def _read_body(self, req: _Request) -> bytes:
        """The whole body; 413 as soon as it is known to be over the limit."""
        limit = self.settings.max_body_bytes
        length = req.headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise HttpError(InvalidArgument("Content-Length is not a number"))
            if int(length) > limit:
                raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await req.receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError("client disconnected")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -- headers ------------------------------------------------------------

    def _metadata(self, req: _Request) -> list[tuple[str, str | bytes]]:
        """Authorization, Grpc-Metadata-* and forwarding headers as gRPC metadata."""
        md: list[tuple[str, str | bytes]] = []
        for name, value in req.raw_headers:
            if name == b"authorization":
                md.append(("authorization", _printable("Authorization", value)))
            elif name.startswith(b"grpc-metadata-"):
                key = name[14:].decode("latin-1")
                header = "Grpc-Metadata-" + key
                if (
                    not _METADATA_KEY.match(key)
                    or key.startswith("grpc-")
                    or key in RESERVED_METADATA
                ):
                    raise HttpError(
                        InvalidArgument(
                            f"{header}: {key!r} is not a metadata key a client may set",
                            reason="INVALID_HEADER",
                        )
                    )
                if key.endswith("-bin"):
                    md.append((key, _base64(header, value)))
                else:
                    md.append((key, _printable(header, value)))
        client = req.scope.get("client")
        if client:
            prior = req.headers.get(b"x-forwarded-for")
            hop = str(client[0])
            md.append(("x-forwarded-for", f"{prior.decode('latin-1')}, {hop}" if prior else hop))
        host = req.headers.get(b"host")
        if host and _PRINTABLE.match(host):
            md.append(("x-forwarded-host", host.decode("ascii")))
        return md

    def _timeout(self, req: _Request, streaming: bool) -> float | None:
        """The deadline from Grpc-Timeout / X-Request-Timeout (the smaller), capped."""
        found: list[float] = []
        raw = req.headers.get(b"grpc-timeout")
        if raw is not None:
            m = _GRPC_TIMEOUT.match(raw.decode("latin-1"))
            if m is None:
                raise HttpError(
                    InvalidArgument(
                        "Grpc-Timeout must be up to 8 digits and a unit (H, M, S, m, u, n), e.g. 500m",
                        reason="INVALID_HEADER",
                    )
                )
            found.append(int(m.group(1)) * _UNITS[m.group(2)])
        raw = req.headers.get(b"x-request-timeout")
        if raw is not None:
            text = raw.decode("latin-1").strip()
            if not _SECONDS.match(text):
                raise HttpError(
                    InvalidArgument(
                        "X-Request-Timeout must be a number of seconds, e.g. 2.5",
                        reason="INVALID_HEADER",
                    )
                )
            found.append(float(text))
        if found:
            return min(*found, self.settings.max_timeout)
        if streaming or not self.settings.default_timeout:
            return None
        return self.settings.default_timeout

    # -- streams ------------------------------------------------------------

    async def _stream(
        self,
        req: _Request,
        send: Send,
        plan: _Plan,
        request: Any,
        metadata: list[tuple[str, str | bytes]],
        deadline: float | None,
    ) -> None:
        """A server stream as NDJSON (``{"result":...}`` per line) or SSE.

        Headers go out with the first message, so a call that fails before
        producing anything gets an ordinary error response with the right
        HTTP status; a failure after that is the stream's last item.
        """
        call = plan.call(request, metadata=metadata, timeout=deadline)
        try:
            item = await call.read()
        except grpc.aio.AioRpcError as err:
            raise self._backend_error(req, plan.binding, err) from None
        sse = b"text/event-stream" in req.headers.get(b"accept", b"")
        headers: Headers = [
            (b"content-type", b"text/event-stream" if sse else b"application/x-ndjson"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        headers += _metadata_headers(b"grpc-metadata-", await call.initial_metadata())
        await self._start(req, send, 200, headers)
        watcher = asyncio.create_task(_cancel_on_disconnect(req.receive, call))
        try:
            while item is not grpc.aio.EOF:
                value = self._render(plan, item)
                chunk = (
                    b"data: " + dumps(value) + b"\n\n" if sse else dumps({"result": value}) + b"\n"
                )
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                item = await self._next(call, send if sse else None)
        except grpc.aio.AioRpcError as err:
            status = self._backend_error(req, plan.binding, err).status
            payload = dumps(status_json(status))
            chunk = (
                b"event: error\ndata: " + payload + b"\n\n"
                if sse
                else b'{"error":' + payload + b"}\n"
            )
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not call.cancelled() or (task is not None and task.cancelling()):
                raise
            return  # the client went away; the backend call is cancelled
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _next(self, call: Any, send: Send | None) -> Any:
        """The next stream item; on SSE, a keep-alive comment while the stream is idle."""
        if send is None or not self.settings.sse_keepalive:
            return await call.read()
        task = asyncio.ensure_future(call.read())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.settings.sse_keepalive)
                if done:
                    return task.result()
                await send(
                    {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}
                )
        finally:
            if not task.done():
                task.cancel()

    # -- errors -------------------------------------------------------------

    def _backend_error(
        self, req: _Request, binding: Binding, err: grpc.aio.AioRpcError
    ) -> HttpError:
        status = from_rpc_error(err)
        code = code_of(status)
        if code == grpc.StatusCode.UNAVAILABLE and not status.details and _unreachable(err):
            # The channel's own error names internal addresses; say which service instead.
            log.warning(
                "%s unavailable for %s: %s", binding.backend, binding.grpc_path, err.details()
            )
            status = Unavailable(
                f"{binding.backend} is unavailable; retry later",
                reason="BACKEND_UNAVAILABLE",
                metadata={"service": binding.backend},
            ).to_status()
        headers = _metadata_headers(b"grpc-metadata-", err.initial_metadata())
        headers += _metadata_headers(b"grpc-trailer-", err.trailing_metadata())
        return HttpError(status, headers=headers)

    def _not_allowed(self, method: str, path: str, allowed: list[str]) -> HttpError:
        # 405 with Allow (RFC 9110), where grpc-gateway answers 501; the Status
        # code stays UNIMPLEMENTED as grpc-gateway's does.
        return HttpError(
            Unimplemented(
                f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                reason="METHOD_NOT_ALLOWED",
            ),
            http=405,
            headers=[(b"allow", ", ".join(allowed).encode())],
        )

    async def _send_error(self, req: _Request, send: Send, err: HttpError) -> None:
        status = err.status
        body = dumps(status_json(status))
        headers = [_JSON, (b"content-length", str(len(body)).encode()), *err.headers]
        if err.http == 401:
            challenge = b'Bearer realm="autoecoops"'
            if b"authorization" in req.headers:
                challenge += b', error="invalid_token"'
            headers.append((b"www-authenticate", challenge))
        delay = _retry_after(status)
        if delay is not None:
            headers.append((b"retry-after", str(delay).encode()))
        await self._send(req, send, err.http, headers, body)

    # -- responses ------------------------------------------------------------

    async def _start(self, req: _Request, send: Send, status: int, headers: Headers) -> None:
        if req.cors:
            exposed = sorted(
                {
                    name.decode()
                    for name, _ in headers
                    if name.startswith((b"grpc-metadata-", b"grpc-trailer-"))
                    or name in (b"www-authenticate", b"retry-after")
                }
            )
            headers = [*headers, *req.cors]
            if exposed:
                headers.append((b"access-control-expose-headers", ", ".join(exposed).encode()))
        req.started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send(
        self, req: _Request, send: Send, status: int, headers: Headers, body: bytes
    ) -> None:
        await self._start(req, send, status, headers)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- CORS ---------------------------------------------------------------

    def _cors(self, req: _Request) -> Headers:
        """The CORS headers of this request's response ([] when CORS does not apply)."""
        origin = req.headers.get(b"origin")
        if not self._origins or origin is None:
            return []
        text = origin.decode("latin-1")
        if "*" in self._origins:
            headers = [(b"access-control-allow-origin", b"*")]
        elif text in self._origins:
            headers = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
        else:
            return []
        if self.settings.cors_allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    async def _preflight(self, req: _Request, send: Send, allowed: list[str]) -> None:
        if not allowed:
            raise HttpError(NotFound(f"no API at {req.scope['path']}", reason="NO_ROUTE"))
        wanted = req.headers.get(b"access-control-request-method", b"").decode("latin-1").upper()
        if wanted not in allowed:
            raise self._not_allowed(wanted, req.scope["path"], allowed)
        asked = req.headers.get(b"access-control-request-headers", b"").decode("latin-1")
        names = [h.strip().lower() for h in asked.split(",") if h.strip()]
        refused = [
            h for h in names if h not in CORS_REQUEST_HEADERS and not h.startswith("grpc-metadata-")
        ]
        if refused:
            raise HttpError(
                PermissionDenied(
                    f"CORS: request headers not allowed: {', '.join(refused)}",
                    reason="CORS_HEADER_DENIED",
                )
            )
        headers = [
            (b"access-control-allow-methods", ", ".join(allowed).encode()),
            (b"access-control-max-age", str(self.settings.cors_max_age).encode()),
            (b"content-length", b"0"),
        ]
        if names:
            headers.append((b"access-control-allow-headers", ", ".join(names).encode()))
        await self._send(req, send, 204, headers, b"")

    # -- fixed endpoints ------------------------------------------------------

    async def _healthz(self, req: _Request, send: Send) -> None:
        states = await self.backends.health(self.settings.health_timeout)
        ok = all(s == SERVING for s in states.values())
        body = dumps({"status": "SERVING" if ok else "NOT_SERVING", "backends": states})
        await self._send(
            req, send, 200 if ok else 503, [_JSON, (b"cache-control", b"no-store")], body
        )

    async def _openapi(self, req: _Request, send: Send) -> None:
        if req.scope["path"].endswith(".json"):
            await self._send(req, send, 200, [_JSON], self._openapi_json)
            return
        if self._openapi_yaml is None:
            import yaml

            self._openapi_yaml = yaml.safe_dump(
                self.document, sort_keys=False, allow_unicode=True
            ).encode("utf-8")
        await self._send(
            req, send, 200, [(b"content-type", b"application/yaml")], self._openapi_yaml
        )

    async def _webui_file(self, req: _Request, send: Send, path: str) -> None:
        """A file of the console bundle: /console/..., and /docs (Swagger UI)."""
        if req.method not in ("GET", "HEAD"):
            raise self._not_allowed(req.method, path, ["GET", "HEAD"])
        asset = self._webui.find(path)
        if asset is None:
            raise HttpError(
                NotFound(
                    f"no console file at {path} (a checkout without the bundle builds it "
                    "with ./dev gen)",
                    reason="NO_ROUTE",
                    resource_name=path,
                )
            )
        headers = asset.headers()
        if req.headers.get(b"if-none-match") == asset.etag.encode():
            await self._send(req, send, 304, headers, b"")
            return
        headers.append((b"content-length", str(len(asset.body)).encode()))
        await self._send(req, send, 200, headers, b"" if req.method == "HEAD" else asset.body)


async def _cancel_on_disconnect(receive: Receive, call: Any) -> None:
    """Cancel the backend call when the HTTP client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


def _left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline``; 504 when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise HttpError(
            DeadlineExceeded(
                "the request's deadline (Grpc-Timeout / X-Request-Timeout) passed "
                "before the call was made",
            )
        )
    return left


def _unreachable(err: grpc.aio.AioRpcError) -> bool:
    # gRPC's own words when it could not reach (or lost) the server, as
    # opposed to a server that answered UNAVAILABLE itself.
    text = (err.details() or "").lower()
    return any(
        words in text
        for words in ("failed to connect", "connection refused", "dns resolution", "socket closed")
    )


def _load(body: bytes, where: str) -> Any:
    try:
        return load_json(body)
    except BodyError as err:
        field = "" if where == "*" else where
        raise _invalid([FieldViolation(field, str(err))], "INVALID_JSON") from None


def _invalid(violations: Sequence[FieldViolation], reason: str = "INVALID_REQUEST") -> HttpError:
    summary = "; ".join(
        f"{v.field}: {v.description}" if v.field else v.description for v in violations[:5]
    )
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return HttpError(
        InvalidArgument(
            f"invalid request: {summary}{more}", reason=reason, field_violations=violations
        )
    )


def _too_large(limit: int) -> HttpError:
    return HttpError(
        ResourceExhausted(
            f"the request body is larger than {limit} bytes",
            reason="BODY_TOO_LARGE",
            metadata={"limit": str(limit)},
        ),
        http=413,
    )


def _printable(header: str, value: bytes) -> str:
    if not _PRINTABLE.match(value):
        raise HttpError(
            InvalidArgument(f"{header}: only printable ASCII is allowed", reason="INVALID_HEADER")
        )
    return value.decode("ascii")


def _base64(header: str, value: bytes) -> bytes:
    text = value.strip().replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(
            InvalidArgument(f"{header}: a -bin header must be base64", reason="INVALID_HEADER")
        ) from None


def _metadata_headers(prefix: bytes, metadata: Iterable[tuple[str, str | bytes]] | None) -> Headers:
    out: Headers = []
    for key, value in metadata or ():
        if key == "grpc-status-details-bin":
            continue  # already the body
        raw = base64.b64encode(value) if isinstance(value, bytes) else value.encode("latin-1")
        out.append((prefix + key.encode("latin-1"), raw))
    return out


def _retry_after(status: status_pb2.Status) -> int | None:
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            nanos: int = info.retry_delay.ToNanoseconds()
            return max(0, -(-nanos // 1_000_000_000))
    return None
