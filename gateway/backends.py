"""The gateway's connections: one pooled channel per backend, and their health.

Channels use the mesh's channel options (``config.channel_options``) but not
the client factory's interceptors, on purpose: none of them applies at the
edge (there is no served call whose deadline to propagate, and the gateway
must never attach a service identity to a caller's request), and grpc.aio
interceptors cost about a quarter of the gateway's throughput
(bench/bench_gateway.py). The gateway injects the trace context itself.
Each RPC's callable is built once, with its request and response classes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.gateway.rules import Binding
from autoecoops.kernel.mesh.clients import idempotent_methods_of
from autoecoops.kernel.mesh.config import MeshConfig, channel_options, replica_options

SERVING = "SERVING"


class Backends:
    """Channels and per-RPC callables for the services the bindings route to."""

    def __init__(self, config: MeshConfig, bindings: Iterable[Binding]) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[str, Any] = {}
        self.names = sorted({b.backend for b in bindings})

    def channel(self, name: str) -> grpc.aio.Channel:
        """The pooled channel to backend ``name`` (at ``config.addr(name)``); a
        backend with several replicas gets the mesh's replica policy (round
        robin, health checks, idempotent calls retried on another replica)."""
        channel = self._channels.get(name)
        if channel is None:
            replicas = (
                replica_options(idempotent_methods_of(name))
                if self._config.replicated(name)
                else []
            )
            channel = grpc.aio.insecure_channel(
                self._config.addr(name), options=[*channel_options(self._config), *replicas]
            )
            self._channels[name] = channel
        return channel

    def callable_for(self, binding: Binding) -> Any:
        """The grpc.aio multi-callable of ``binding``'s RPC (cached per method)."""
        path = binding.grpc_path
        found = self._callables.get(path)
        if found is not None:
            return found
        method = binding.method
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        channel = self.channel(binding.backend)
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
            stub = health_pb2_grpc.HealthStub(self.channel(name))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=limit)
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        results = await asyncio.gather(*(check(n) for n in self.names))
        return dict(zip(self.names, results, strict=True))

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        self._callables.clear()
        for channel in channels:
            await channel.close()
