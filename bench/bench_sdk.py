"""SDK overhead (issue #9): one call through the SDK against the same call
through the generated stub, on the same channel, to the same server.

The server is the mesh runtime in its own process, serving a public,
idempotent RPC (AuthService.GetOpenIdConfiguration). The SDK call adds what
it is for: request building from keyword arguments, the retry loop and
throttle bookkeeping, the deadline, a client span and ``traceparent``, and
error conversion. Measured for the async and the sync client: p50/p99 of
sequential calls (alternating rounds, so drift hits both alike) and
requests/s with concurrent callers. The target is a ratio of at most 1.15.

    .venv/bin/python bench/bench_sdk.py [--calls 4000] [--seconds 1] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.sdk import AsyncClient, Client

ROOT = Path(__file__).resolve().parent.parent
AUTH = "autoecoops.auth.v1.AuthService"

SERVER = r"""
import asyncio, sys
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.service import AuthServicer
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.server import Mesh, Runtime

class Echo(AuthServicer):
    async def GetOpenIdConfiguration(self, request, context):
        return auth_pb2.GetOpenIdConfigurationResponse(issuer="bench")

def register(server, runtime):
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(None), server)
    return ["autoecoops.auth.v1.AuthService"]

async def main(port):
    cfg = MeshConfig(ports={"auth-service": port})
    mesh = Mesh(cfg, Runtime(config=cfg, clients=ClientFactory(cfg)))
    await mesh.start(["auth-service"], {"auth-service": register})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(name: str, raw: list[float], sdk: list[float], raw_rps: float, sdk_rps: float) -> float:
    r50, s50 = pct(raw, 0.5) * 1e6, pct(sdk, 0.5) * 1e6
    r99, s99 = pct(raw, 0.99) * 1e6, pct(sdk, 0.99) * 1e6
    ratio = s50 / r50
    print(f"== {name}")
    print(f"  raw stub  p50 {r50:7.1f} us  p99 {r99:7.1f} us  {raw_rps:8.0f} req/s")
    print(f"  SDK       p50 {s50:7.1f} us  p99 {s99:7.1f} us  {sdk_rps:8.0f} req/s")
    print(
        f"  ratio SDK/raw: p50 {ratio:.3f}x, throughput {raw_rps / sdk_rps:.3f}x (target <= 1.15x)"
    )
    return ratio


async def async_bench(config: MeshConfig, calls: int, seconds: float, concurrency: int) -> float:
    async with AsyncClient(config=config) as sdk:
        stub = auth_pb2_grpc.AuthServiceStub(sdk.channel(AUTH))
        request = auth_pb2.GetOpenIdConfigurationRequest()

        def raw() -> Awaitable[object]:
            call: Awaitable[object] = stub.GetOpenIdConfiguration(request, timeout=30.0)
            return call

        def via_sdk() -> Awaitable[object]:
            return sdk.auth.get_open_id_configuration(request)

        for fn in (raw, via_sdk):  # warm up connections and caches
            for _ in range(300):
                await fn()
        lat: dict[str, list[float]] = {"raw": [], "sdk": []}
        rounds = 20
        for _ in range(rounds):
            for name, fn in (("raw", raw), ("sdk", via_sdk)):
                for _ in range(calls // rounds):
                    t0 = time.perf_counter()
                    await fn()
                    lat[name].append(time.perf_counter() - t0)

        async def throughput(fn: Callable[[], Awaitable[object]]) -> float:
            done = 0
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await fn()
                    done += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return done / (time.perf_counter() - t0)

        # Alternating rounds, median of each side: the box is shared and noisy.
        rps: dict[str, list[float]] = {"raw": [], "sdk": []}
        for _ in range(3):
            rps["raw"].append(await throughput(raw))
            rps["sdk"].append(await throughput(via_sdk))
        raw_rps, sdk_rps = statistics.median(rps["raw"]), statistics.median(rps["sdk"])
    return report(
        "async client (AsyncClient vs grpc.aio stub)", lat["raw"], lat["sdk"], raw_rps, sdk_rps
    )


def sync_bench(config: MeshConfig, calls: int, seconds: float, concurrency: int) -> float:
    with Client(config=config) as sdk:
        stub = auth_pb2_grpc.AuthServiceStub(sdk.channel(AUTH))
        request = auth_pb2.GetOpenIdConfigurationRequest()

        def raw() -> object:
            return stub.GetOpenIdConfiguration(request, timeout=30.0)

        def via_sdk() -> object:
            return sdk.auth.get_open_id_configuration(request)

        for fn in (raw, via_sdk):
            for _ in range(300):
                fn()
        lat: dict[str, list[float]] = {"raw": [], "sdk": []}
        rounds = 20
        for _ in range(rounds):
            for name, fn in (("raw", raw), ("sdk", via_sdk)):
                for _ in range(calls // rounds):
                    t0 = time.perf_counter()
                    fn()
                    lat[name].append(time.perf_counter() - t0)

        def throughput(fn: Callable[[], object]) -> float:
            done = [0] * concurrency
            stop = time.perf_counter() + seconds

            def worker(i: int) -> None:
                while time.perf_counter() < stop:
                    fn()
                    done[i] += 1

            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(worker, range(concurrency)))
            return sum(done) / (time.perf_counter() - t0)

        rps: dict[str, list[float]] = {"raw": [], "sdk": []}
        for _ in range(3):
            rps["raw"].append(throughput(raw))
            rps["sdk"].append(throughput(via_sdk))
        raw_rps, sdk_rps = statistics.median(rps["raw"]), statistics.median(rps["sdk"])
    return report("sync client (Client vs grpc stub)", lat["raw"], lat["sdk"], raw_rps, sdk_rps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="sequential calls per side")
    parser.add_argument("--seconds", type=float, default=1.0, help="each throughput round")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        out = server.stdout
        assert out is not None
        ready = threading.Event()

        def wait_ready() -> None:
            if out.readline():
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(30):
            raise SystemExit("the benchmark server did not start")
        config = MeshConfig(ports={"auth-service": port})
        print(f"server: mesh runtime in a subprocess on 127.0.0.1:{port}; client: this process")
        ratios = [
            asyncio.run(async_bench(config, args.calls, args.seconds, args.concurrency)),
            sync_bench(config, args.calls, args.seconds, args.concurrency),
        ]
    finally:
        server.terminate()
        server.wait(10)
    return 0 if max(ratios) <= 1.15 else 1


if __name__ == "__main__":
    raise SystemExit(main())
