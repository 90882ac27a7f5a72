"""An RPC the SDK has never seen works without SDK changes.

The test writes a new proto package, compiles it with grpc_tools as
``./dev gen`` would, and makes it importable as ``autoecoops.sdkprobe.v1``.
A server serves it through the mesh runtime; the SDK finds the new service as
``client.sdkprobe``, its RPCs as snake_case methods, and follows their method
options: the idempotent one is retried, the other is not, the stream is not.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

import autoecoops
from autoecoops.kernel.mesh.errors import Unavailable
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.sdk import AsyncClient, AsyncStream, Client, Stream
from tests.conftest import StartMesh
from tests.integration.sdk.scripted import FakeClock

ROOT = Path(__file__).resolve().parents[3]
PROTO = """
syntax = "proto3";

package autoecoops.sdkprobe.v1;

import "autoecoops/common/v1/options.proto";
import "google/api/field_behavior.proto";

// A service added after the SDK was written.
service ProbeService {
  // Echoes; safe to repeat.
  rpc EchoText(EchoTextRequest) returns (EchoTextResponse) {
    option (autoecoops.common.v1.method) = {public: true idempotent: true};
  }
  // Records a shout; not safe to repeat.
  rpc RecordShout(EchoTextRequest) returns (EchoTextResponse) {
    option (autoecoops.common.v1.method) = {public: true};
  }
  // Counts up to n, one response each.
  rpc CountTo(CountToRequest) returns (stream EchoTextResponse) {
    option (autoecoops.common.v1.method) = {public: true idempotent: true};
  }
  // Joins the texts of a stream of requests.
  rpc JoinTexts(stream EchoTextRequest) returns (EchoTextResponse) {
    option (autoecoops.common.v1.method) = {public: true};
  }
  // Answers each request as it arrives.
  rpc Converse(stream EchoTextRequest) returns (stream EchoTextResponse) {
    option (autoecoops.common.v1.method) = {public: true};
  }
}

message EchoTextRequest {
  string text = 1 [(google.api.field_behavior) = REQUIRED];
  repeated string tags = 2;
}

message EchoTextResponse {
  string text = 1;
  string trace_id = 2;
}

message CountToRequest {
  int32 n = 1;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated module of the new proto, importable as autoecoops.sdkprobe.v1."""
    from google.api import field_behavior_pb2
    from grpc_tools import protoc

    tmp = tmp_path_factory.mktemp("newproto")
    src = tmp / "proto" / "autoecoops" / "sdkprobe" / "v1"
    src.mkdir(parents=True)
    (src / "probe.proto").write_text(PROTO)
    out = tmp / "gen"
    out.mkdir()
    includes = [
        tmp / "proto",
        ROOT / "proto",
        # googleapis' protos ship in googleapis-common-protos, as scripts/gen.py finds them.
        Path(field_behavior_pb2.__file__).resolve().parents[2],
        Path(protoc.__file__).parent / "_proto",
    ]
    args = [
        "protoc",
        *(f"-I{p}" for p in includes),
        f"--python_out={out}",
        "autoecoops/sdkprobe/v1/probe.proto",
    ]
    assert protoc.main(args) == 0
    for d in (out / "autoecoops" / "sdkprobe", out / "autoecoops" / "sdkprobe" / "v1"):
        (d / "__init__.py").touch()
    # What `pip install -e .` does for gen/python: the package joins `autoecoops`.
    autoecoops.__path__.append(str(out / "autoecoops"))
    try:
        yield importlib.import_module("autoecoops.sdkprobe.v1.probe_pb2")
    finally:
        autoecoops.__path__.remove(str(out / "autoecoops"))


class ProbeServer:
    """Serves the new service with plain handlers; counts attempts."""

    def __init__(self, pb2: ModuleType) -> None:
        self.pb2 = pb2
        self.attempts: dict[str, int] = {"EchoText": 0, "RecordShout": 0, "CountTo": 0}
        self.attempts.update(JoinTexts=0, Converse=0)
        self.failures: dict[str, int] = {}

    def _attempt(self, method: str) -> None:
        self.attempts[method] += 1
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            raise Unavailable("warming up")

    async def echo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._attempt("EchoText")
        return self.pb2.EchoTextResponse(
            text=request.text + "".join(request.tags), trace_id=current_trace_id()
        )

    async def shout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._attempt("RecordShout")
        return self.pb2.EchoTextResponse(text=request.text.upper())

    async def count(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self._attempt("CountTo")
        for i in range(1, request.n + 1):
            yield self.pb2.EchoTextResponse(text=str(i), trace_id=current_trace_id())

    async def join(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        self._attempt("JoinTexts")
        texts = [r.text async for r in requests]
        return self.pb2.EchoTextResponse(text="+".join(texts), trace_id=current_trace_id())

    async def converse(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        self._attempt("Converse")
        async for r in requests:
            yield self.pb2.EchoTextResponse(text=r.text[::-1], trace_id=current_trace_id())

    def register(self, server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
        pb2 = self.pb2
        name = pb2.DESCRIPTOR.services_by_name["ProbeService"].full_name

        def unary(fn: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, pb2.EchoTextRequest.FromString, pb2.EchoTextResponse.SerializeToString
            )

        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    name,
                    {
                        "EchoText": unary(self.echo),
                        "RecordShout": unary(self.shout),
                        "CountTo": grpc.unary_stream_rpc_method_handler(
                            self.count,
                            pb2.CountToRequest.FromString,
                            pb2.EchoTextResponse.SerializeToString,
                        ),
                        "JoinTexts": grpc.stream_unary_rpc_method_handler(
                            self.join,
                            pb2.EchoTextRequest.FromString,
                            pb2.EchoTextResponse.SerializeToString,
                        ),
                        "Converse": grpc.stream_stream_rpc_method_handler(
                            self.converse,
                            pb2.EchoTextRequest.FromString,
                            pb2.EchoTextResponse.SerializeToString,
                        ),
                    },
                )
            ]
        )
        return [name]


async def test_a_new_service_and_its_rpcs_work_without_sdk_changes(
    start_mesh: StartMesh, probe: ModuleType
) -> None:
    server = ProbeServer(probe)
    # Served from memory-hub's slot; the SDK is told where the new service lives.
    mesh = await start_mesh(["memory-hub"], {"memory-hub": server.register})
    where = {"autoecoops.sdkprobe.v1.ProbeService": mesh.config.addr("memory-hub")}
    fake = FakeClock()
    async with AsyncClient(addresses=where, config=mesh.config, clock=fake.clock()) as sdk:
        # Keyword arguments or a message, typed by the new descriptors.
        reply, call = await sdk.sdkprobe.echo_text.with_call(text="hi", tags=["!", "?"])
        assert isinstance(reply, probe.EchoTextResponse) and reply.text == "hi!?"
        assert reply.trace_id == call.trace_id
        same = await sdk.sdkprobe.echo_text(probe.EchoTextRequest(text="again"))
        assert same.text == "again"
        # The contract's idempotent flag drives retries.
        server.failures["EchoText"] = 2
        _, call = await sdk.sdkprobe.echo_text.with_call(text="x")
        assert call.attempts == 3
        server.failures["RecordShout"] = 1
        with pytest.raises(Unavailable):
            await sdk.sdkprobe.record_shout(text="x")
        assert server.attempts["RecordShout"] == 1
        # Streams work, carry their trace id, and are never retried.
        stream = sdk.sdkprobe.count_to(n=3)
        assert isinstance(stream, AsyncStream)
        texts = [(r.text, r.trace_id) async for r in stream]
        assert [t for t, _ in texts] == ["1", "2", "3"]
        assert {tid for _, tid in texts} == {stream.trace_id}
        server.failures["CountTo"] = 1
        with pytest.raises(Unavailable):
            [r async for r in sdk.sdkprobe.count_to(n=2)]
        assert server.attempts["CountTo"] == 2
        # Client streaming, from a list or an async generator; never retried.
        texts = [probe.EchoTextRequest(text=t) for t in ("a", "b", "c")]
        joined, call = await sdk.sdkprobe.join_texts.with_call(texts)
        assert joined.text == "a+b+c" and joined.trace_id == call.trace_id

        async def produce() -> AsyncIterator[Any]:
            for t in ("x", "y"):
                yield probe.EchoTextRequest(text=t)

        assert (await sdk.sdkprobe.join_texts(produce())).text == "x+y"
        # Bidirectional: with an iterable, or opened empty and written to.
        replies = [r.text async for r in sdk.sdkprobe.converse(texts[:2])]
        assert replies == ["a", "b"]
        session = sdk.sdkprobe.converse()
        async with session:
            await session.write(probe.EchoTextRequest(text="abc"))
            first = await anext(session)
            await session.write(probe.EchoTextRequest(text="xyz"))
            second = await anext(session)
            await session.done_writing()
            assert [r async for r in session] == []
        assert (first.text, second.text) == ("cba", "zyx")
        assert first.trace_id == second.trace_id == session.trace_id
        # The request's required field is checked by the server's contract too.
        with pytest.raises(Exception, match="text"):
            await sdk.sdkprobe.echo_text()

    def sync() -> None:
        with Client(addresses=where, config=mesh.config) as client:
            assert client.sdkprobe.echo_text(text="sync").text == "sync"
            stream = client.sdkprobe.count_to(n=2, timeout=30)
            assert isinstance(stream, Stream)
            assert [r.text for r in stream] == ["1", "2"]
            texts = [probe.EchoTextRequest(text=t) for t in ("p", "q")]
            assert client.sdkprobe.join_texts(iter(texts)).text == "p+q"
            with client.sdkprobe.converse(texts, timeout=30) as talk:
                assert [r.text for r in talk] == ["p", "q"]

    await asyncio.to_thread(sync)
    assert "autoecoops.sdkprobe.v1.probe_pb2" in sys.modules
