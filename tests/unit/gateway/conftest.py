"""The gateway against a real grpc.aio backend serving the test-only KitchenService.

kitchen.proto (beside this file) uses every binding shape: nested and
multi-segment path variables, ``**``, verbs, ``body: "*"`` and a body field,
``response_body``, additional bindings, server and client streams. It is
compiled once per run and added to the default descriptor pool, as the
generated modules add the production protos.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from autoecoops.gateway.rules import Binding, bindings_of
from autoecoops.gateway.server import GatewayServer, start_gateway
from autoecoops.gateway.settings import GatewaySettings
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY, AutoEcoOpsError
from tests.conftest import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SERVICE = "autoecoops.gatewaytest.v1.KitchenService"
BACKEND = "kitchen"


def _compile() -> descriptor_pb2.FileDescriptorSet:
    import google.api.annotations_pb2 as anchor
    import grpc_tools

    googleapis = Path(anchor.__file__).resolve().parents[2]
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kitchen.binpb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{HERE}",
                f"-I{ROOT / 'proto'}",
                f"-I{googleapis}",
                f"-I{wkt}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                "kitchen.proto",
            ],
            check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="session")
def kitchen_file() -> descriptor_pb2.FileDescriptorProto:
    """kitchen.proto with comments, also registered in the default pool."""
    # kitchen.proto's imports must be in the default pool before it.
    from google.api import annotations_pb2, field_behavior_pb2
    from google.protobuf import (
        duration_pb2,
        field_mask_pb2,
        struct_pb2,
        timestamp_pb2,
        wrappers_pb2,
    )

    from autoecoops.common.v1 import options_pb2

    del annotations_pb2, field_behavior_pb2, options_pb2
    del duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2, wrappers_pb2
    fds = _compile()
    proto = fds.file[0]
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(proto.name)
    except KeyError:
        pool.Add(proto)
    return proto


@pytest.fixture(scope="session")
def kitchen_service(
    kitchen_file: descriptor_pb2.FileDescriptorProto,
) -> descriptor.ServiceDescriptor:
    """The KitchenService descriptor."""
    return descriptor_pool.Default().FindServiceByName(SERVICE)


@pytest.fixture(scope="session")
def kitchen_bindings(kitchen_service: descriptor.ServiceDescriptor) -> list[Binding]:
    """The bindings of KitchenService, routed to the backend named 'kitchen'."""
    return list(bindings_of(kitchen_service, BACKEND))


def cls(name: str) -> type[Message]:
    """The message class of ``autoecoops.gatewaytest.v1.<name>``."""
    desc = descriptor_pool.Default().FindMessageTypeByName(f"autoecoops.gatewaytest.v1.{name}")
    return message_factory.GetMessageClass(desc)


@dataclass
class KitchenServicer:
    """The test backend; counts calls so tests can assert none was made."""

    calls: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def Echo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Echo")
        reply = cls("Kitchen")()
        reply.CopyFrom(request)
        reply.etag = "e1"
        return reply

    async def GetThing(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("GetThing")
        return cls("Thing")(name=request.name)

    async def GetFile(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("GetFile")
        return cls("File")(
            meta=cls("FileMeta")(path=request.path, size=len(request.path)), content=b"x"
        )

    async def Frobnicate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Frobnicate")
        return cls("FrobnicateResponse")(result=f"{request.name} x{request.times}")

    async def Fail(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Fail")
        code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
        kwargs: dict[str, Any] = {}
        if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            kwargs["retry_delay"] = 2.5
        err = AutoEcoOpsError.class_for(code)(
            request.message or f"failed with {code.name}", **kwargs
        )
        await context.abort(
            code,
            err.message,
            trailing_metadata=((STATUS_DETAILS_KEY, err.to_status().SerializeToString()),),
        )

    async def Inspect(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Inspect")
        reply = [tuple(r.split("=", 1)) for r in request.reply]
        await context.send_initial_metadata(reply)
        context.set_trailing_metadata((("x-trailer", "done"),))
        remaining = context.time_remaining()
        metadata = [
            f"{k}={v.hex() if isinstance(v, bytes) else v}"
            for k, v in context.invocation_metadata() or ()
        ]
        return cls("InspectResponse")(
            metadata=metadata, time_remaining=-1.0 if remaining is None else remaining
        )

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Watch")
        for seq in range(request.count):
            if request.interval_ms:
                await asyncio.sleep(request.interval_ms / 1000)
            yield cls("WatchEvent")(topic=request.topic, seq=seq)
        if request.fail_code:
            code = next(c for c in grpc.StatusCode if c.value[0] == request.fail_code)
            await context.abort(code, "the stream broke")

    async def Upload(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Upload")
        total = count = 0
        async for r in requests:
            total += r.value
            count += 1
        return cls("UploadResponse")(total=total, messages=count)

    async def Secret(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._count("Secret")
        md = dict(context.invocation_metadata() or ())
        if md.get("authorization") != "Bearer good":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return cls("SecretResponse")(secret="s3cret")


def _handlers(
    service: descriptor.ServiceDescriptor, servicer: KitchenServicer
) -> grpc.GenericRpcHandler:
    handlers = {}
    for m in service.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        make: Callable[..., grpc.RpcMethodHandler] = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


@dataclass
class Kitchen:
    """A running backend and gateway, and an HTTP client for the gateway."""

    servicer: KitchenServicer
    gateway: GatewayServer
    http: httpx.AsyncClient
    backend_port: int

    @property
    def base(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.gateway.port}"


async def _start(
    service: descriptor.ServiceDescriptor,
    bindings: list[Binding],
    settings: GatewaySettings | None,
    backend: bool,
    cleanup: list[Callable[[], Any]],
) -> Kitchen:
    servicer = KitchenServicer()
    port = free_port()
    if backend:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handlers(service, servicer),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        cleanup.append(lambda: server.stop(0))
    config = MeshConfig(addrs={BACKEND: f"127.0.0.1:{port}"}, shutdown_grace=1.0)
    gateway = await start_gateway(
        config,
        settings or GatewaySettings(port=0),
        bindings=bindings,
    )
    cleanup.append(gateway.stop)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=10)
    cleanup.append(http.aclose)
    return Kitchen(servicer, gateway, http, port)


async def _cleanup(cleanup: list[Callable[[], Any]]) -> None:
    for close in reversed(cleanup):
        await close()


# The tests of a module share one event loop, so one backend and gateway
# serve all of them (starting a pair per test would dominate the run time).


@pytest_asyncio.fixture(loop_scope="module")
async def start_kitchen(
    kitchen_service: descriptor.ServiceDescriptor, kitchen_bindings: list[Binding]
) -> AsyncIterator[Callable[..., Any]]:
    """Start a backend (unless ``backend=False``) and a gateway with ``settings``."""
    cleanup: list[Callable[[], Any]] = []

    async def start(settings: GatewaySettings | None = None, backend: bool = True) -> Kitchen:
        return await _start(kitchen_service, kitchen_bindings, settings, backend, cleanup)

    yield start
    await _cleanup(cleanup)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_kitchen(
    kitchen_service: descriptor.ServiceDescriptor, kitchen_bindings: list[Binding]
) -> AsyncIterator[Kitchen]:
    """One backend and gateway with default settings for a module."""
    cleanup: list[Callable[[], Any]] = []
    yield await _start(kitchen_service, kitchen_bindings, None, True, cleanup)
    await _cleanup(cleanup)


@pytest_asyncio.fixture(loop_scope="module")
async def kitchen(shared_kitchen: Kitchen) -> Kitchen:
    """The module's backend and gateway, with the backend's call counts reset."""
    shared_kitchen.servicer.calls.clear()
    return shared_kitchen


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw HTTP/1.1 bytes (for paths and bodies httpx would normalise)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body
