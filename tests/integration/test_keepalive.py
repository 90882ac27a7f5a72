"""An idle mesh still answers: clients ping idle channels and servers accept it.

Before, clients pinged every 30 s with ``keepalive_permit_without_calls``
while servers kept gRPC's default policy (one ping per five minutes, none
without a call), answered ``GOAWAY too_many_pings``, and the first calls after
an idle spell failed with UNAVAILABLE "Too many pings" (503 at the gateway).
Here the interval is one second (gRPC sends at most one ping a second), so
several intervals pass in a few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.gateway import GatewaySettings, MeshWithGateway
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import MeshConfig, channel_options, server_options
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import StartMesh, make_config

INTERVAL = 1.0
#: Long enough for five pings: the old policy sent GOAWAY after the third.
IDLE = INTERVAL * 5.5


class StateLog:
    """Every connectivity state a channel passes through while it is watched."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.states: list[grpc.ChannelConnectivity] = [channel.get_state()]
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await self.channel.wait_for_state_change(self.states[-1])
            self.states.append(self.channel.get_state())

    async def stop(self) -> list[grpc.ChannelConnectivity]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.states


def short_keepalive(config: MeshConfig) -> MeshConfig:
    return dataclasses.replace(config, keepalive_time=INTERVAL, keepalive_timeout=5.0)


def test_servers_accept_what_clients_send() -> None:
    config = MeshConfig()
    client = dict(channel_options(config))
    server = dict(server_options(config))
    assert client["grpc.keepalive_permit_without_calls"] == 1
    assert server["grpc.keepalive_permit_without_calls"] == 1
    # The server must tolerate a ping at least as often as a client sends one.
    assert (
        server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    )
    assert (
        server["grpc.http2.min_recv_ping_interval_without_data_ms"]
        <= (client["grpc.keepalive_time_ms"])
    )


def test_keepalive_is_configured_from_the_environment() -> None:
    config = MeshConfig.from_env(
        {"AUTOECOOPS_KEEPALIVE_SECONDS": "2", "AUTOECOOPS_KEEPALIVE_TIMEOUT_SECONDS": "1"}
    )
    assert dict(channel_options(config))["grpc.keepalive_time_ms"] == 2000
    assert dict(channel_options(config))["grpc.keepalive_timeout_ms"] == 1000
    assert dict(server_options(config))["grpc.http2.min_ping_interval_without_data_ms"] == 1000


async def test_an_idle_channel_survives_many_ping_intervals(
    start_mesh: StartMesh, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    config = make_config(
        redis_url=redis_url, key_prefix=key_prefix, data_dir=tmp_path, shutdown_grace=1.0
    )
    mesh: Mesh = await start_mesh(["auth-service"], config=short_keepalive(config))
    # The mesh's own client factory, as one service calls another.
    clients = ClientFactory(mesh.config)
    try:
        channel = clients.channel("auth-service")
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        # A long-lived stream that carries no data while the channel idles.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        log = StateLog(channel)
        await asyncio.sleep(IDLE)
        reply = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5)
        states = await log.stop()
        assert reply.keys
        # No GOAWAY: the connection stayed up the whole time.
        assert states == [grpc.ChannelConnectivity.READY], states
        assert not watch.done(), await watch.code()
        watch.cancel()
    finally:
        await clients.close()


async def test_an_idle_gateway_still_answers(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    config = short_keepalive(
        make_config(
            redis_url=redis_url, key_prefix=key_prefix, data_dir=tmp_path, shutdown_grace=1.0
        )
    )
    mesh = MeshWithGateway(config, settings=GatewaySettings(port=0))
    await mesh.start(["auth-service"])
    try:
        assert mesh.gateway is not None
        base = f"http://127.0.0.1:{mesh.gateway.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get("/.well-known/jwks.json")).status_code == 200
            log = StateLog(mesh.gateway.app.backends.channel("auth-service"))
            await asyncio.sleep(IDLE)
            after = await http.get("/.well-known/jwks.json")
            states = await log.stop()
            assert after.status_code == 200, after.text
            assert states == [grpc.ChannelConnectivity.READY], states
    finally:
        await mesh.stop(grace=0)
