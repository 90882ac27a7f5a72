"""REST gateway benchmark (issue #3): one unary RPC through the gateway vs direct gRPC.

The backend is auth-service's public GetOpenIdConfiguration with a test
servicer on the mesh runtime (interceptor included), in its own process.
The gateway runs in a second process, as ``autoecoops serve gateway`` does in
its own pod. The client runs here, with the same concurrency on both paths:

* direct:  grpc.aio client -> backend
* gateway: HTTP/1.1 keep-alive client -> gateway (HTTP/JSON -> gRPC) -> backend

The HTTP client is a minimal asyncio one (one keep-alive connection per
caller) so that the client's own cost does not swamp what is measured; the
gRPC client is grpc.aio with one channel, as a real gRPC caller would use.
Reported: sequential latency p50/p99 (one caller), and requests/s with
``--concurrency`` callers, for both paths, and the ratios (targets:
throughput >= 0.5x direct, p50 <= 2x direct).

    .venv/bin/python bench/bench_gateway.py [--calls 3000] [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import free_port, pct

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc

BACKEND = r"""
import asyncio, sys
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.server import Mesh, Runtime

class Echo(auth_pb2_grpc.AuthServiceServicer):
    async def GetOpenIdConfiguration(self, request, context):
        return auth_pb2.GetOpenIdConfigurationResponse(issuer="bench")

def register(server, runtime):
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), server)
    return ["autoecoops.auth.v1.AuthService"]

async def main(port):
    config = MeshConfig(ports={"auth-service": port})
    mesh = Mesh(config, Runtime(config=config, clients=ClientFactory(config)))
    await mesh.start(["auth-service"], {"auth-service": register})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""

GATEWAY = r"""
import asyncio, sys
from autoecoops.gateway import GatewaySettings, start_gateway
from autoecoops.kernel.mesh.config import MeshConfig

async def main(backend, port):
    config = MeshConfig(ports={"auth-service": backend})
    await start_gateway(config, GatewaySettings(port=port))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""

PATH = "/.well-known/openid-configuration"


class HttpCaller:
    """One keep-alive HTTP/1.1 connection making GET requests one at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def call(self) -> bytes:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def measure(
    make: Callable[[], Awaitable[Callable[[], Awaitable[object]]]],
    calls: int,
    seconds: float,
    concurrency: int,
) -> tuple[list[float], float]:
    """Sequential latencies of ``calls`` calls, then requests/s of ``concurrency`` callers."""
    one = await make()
    for _ in range(300):
        await one()
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await one()
        lat.append(time.perf_counter() - t0)
    callers = [await make() for _ in range(concurrency)]
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in callers))
    return lat, done / (time.perf_counter() - t0)


async def direct(
    port: int, calls: int, seconds: float, concurrency: int
) -> tuple[list[float], float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        req = auth_pb2.GetOpenIdConfigurationRequest()

        async def make() -> Callable[[], Awaitable[object]]:
            return lambda: stub.GetOpenIdConfiguration(req)

        return await measure(make, calls, seconds, concurrency)


async def through_gateway(
    port: int, calls: int, seconds: float, concurrency: int
) -> tuple[list[float], float]:
    callers: list[HttpCaller] = []

    async def make() -> Callable[[], Awaitable[object]]:
        caller = HttpCaller(port)
        await caller.open()
        callers.append(caller)
        return caller.call

    try:
        first = await make()
        assert json.loads(await first())["issuer"] == "bench"
        return await measure(make, calls, seconds, concurrency)
    finally:
        for c in callers:
            await c.close()


def start(script: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()

    backend_port, gateway_port = free_port(), free_port()
    backend = start(BACKEND, str(backend_port))
    gateway = start(GATEWAY, str(backend_port), str(gateway_port))
    results: dict[str, tuple[list[float], float]] = {}
    try:
        # Interleaved, so both paths share the machine's noise; best of two.
        for mode in ("direct", "gateway", "direct", "gateway"):
            run = direct if mode == "direct" else through_gateway
            port = backend_port if mode == "direct" else gateway_port
            lat, rps = asyncio.run(run(port, args.calls, args.seconds, args.concurrency))
            prev = results.get(mode)
            if prev is None:
                results[mode] = (lat, rps)
            else:
                best = lat if statistics.median(lat) < statistics.median(prev[0]) else prev[0]
                results[mode] = (best, max(rps, prev[1]))
    finally:
        for proc in (gateway, backend):
            proc.kill()
            proc.wait()

    print(
        f"unary GetOpenIdConfiguration: sequential latency (µs) and throughput with "
        f"{args.concurrency} concurrent callers"
    )
    for mode, label in (("direct", "direct gRPC"), ("gateway", "REST gateway")):
        lat, rps = results[mode]
        print(
            f"  {label:<13} p50 {pct(lat, 0.5) * 1e6:7.0f}  p99 {pct(lat, 0.99) * 1e6:7.0f}  "
            f"{rps:8.0f} req/s"
        )
    (dl, drps), (gl, grps) = results["direct"], results["gateway"]
    print(
        f"  ratio gateway/direct  p50 {pct(gl, 0.5) / pct(dl, 0.5):.2f}x (target <= 2x)  "
        f"p99 {pct(gl, 0.99) / pct(dl, 0.99):.2f}x  "
        f"throughput {grps / drps:.2f}x (target >= 0.5x)"
    )


if __name__ == "__main__":
    main()
