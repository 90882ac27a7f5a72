"""The gateway's connections: one pooled channel per backend, and their health.

Channels come from the mesh's one client factory, so the gateway's calls carry
the same OpenTelemetry client interceptor (``traceparent`` into the backend's
trace) and channel options as calls between services. Each RPC's callable is
built once, with the serializers of its request and response classes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.gateway.rules import Binding
from autoecoops.kernel.mesh.clients import ClientFactory

SERVING = "SERVING"


class Backends:
    """Channels and per-RPC callables for the services the bindings route to."""

    def __init__(self, clients: ClientFactory, bindings: Iterable[Binding]) -> None:
        self._clients = clients
        self._callables: dict[str, Any] = {}
        self.names = sorted({b.backend for b in bindings})

    def callable_for(self, binding: Binding) -> Any:
        """The grpc.aio multi-callable of ``binding``'s RPC (cached per method)."""
        path = binding.grpc_path
        found = self._callables.get(path)
        if found is not None:
            return found
        method = binding.method
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        channel = self._clients.channel(binding.backend)
        kind = (method.client_streaming, method.server_streaming)
        factory = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[kind]
        made = factory(
            path,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        self._callables[path] = made
        return made

    async def health(self, limit: float) -> dict[str, str]:
        """grpc.health.v1 status of every backend (``limit`` seconds each): SERVING,
        NOT_SERVING, or the error code."""

        async def check(name: str) -> str:
            stub = health_pb2_grpc.HealthStub(self._clients.channel(name))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=limit)
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        results = await asyncio.gather(*(check(n) for n in self.names))
        return dict(zip(self.names, results, strict=True))

    async def close(self) -> None:
        """Close every channel."""
        await self._clients.close()
