"""Runtime benchmarks (issue #2).

1. Start-up: `autoecoops up` to all eight services SERVING (polled over gRPC
   health), against a baseline of eight bare grpc.aio servers started by a
   fresh interpreter.
2. Interceptor overhead: one unary RPC through the mesh runtime (OTel, auth
   gate, validation, metrics, error boundary) against the same servicer on a
   bare grpc.aio server with no interceptors. The server runs in its own
   process, the client here; p50/p99 sequential latency and requests/s with
   32 concurrent callers.

    .venv/bin/python bench/bench_runtime.py [--calls 5000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SERVER = r"""
import asyncio, sys
import grpc
from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
class Echo(auth_pb2_grpc.AuthServiceServicer):
    async def GetOpenIdConfiguration(self, request, context):
        return auth_pb2.GetOpenIdConfigurationResponse(issuer="bench")

async def main(mode, port):
    if mode == "bare":
        server = grpc.aio.server()
        auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    else:
        from autoecoops.kernel.mesh.config import MeshConfig
        from autoecoops.kernel.mesh.server import Mesh
        def register(server, runtime):
            auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), server)
            return ["autoecoops.auth.v1.AuthService"]
        cfg = MeshConfig(ports={"auth-service": port})
        mesh = Mesh(cfg)
        await mesh.start(["auth-service"], {"auth-service": register})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

BARE_UP = r"""
import asyncio, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
async def main(ports):
    servers = []
    for p in ports:
        s = grpc.aio.server()
        h = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(h, s)
        s.add_insecure_port(f"127.0.0.1:{p}")
        await s.start()
        servers.append(s)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main([int(p) for p in sys.argv[1:]]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def wait_serving(ports: list[int], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    for port in ports:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"port {port} not SERVING")
                await asyncio.sleep(0.02)


def time_startup(runs: int) -> tuple[list[float], list[float]]:
    from autoecoops.kernel.mesh.config import SERVICES

    mesh_times, bare_times = [], []
    for _ in range(runs):
        ports = [free_port() for _ in SERVICES]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AUTOECOOPS_") and k != "REDIS_URL"
        }
        env.update(
            {f"AUTOECOOPS_{s.env}_PORT": str(p) for s, p in zip(SERVICES, ports, strict=True)}
        )
        env["AUTOECOOPS_GATEWAY_PORT"] = str(free_port())
        with tempfile.TemporaryDirectory() as data:
            env["AUTOECOOPS_DATA_DIR"] = data
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [str(BIN / "autoecoops"), "up"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            asyncio.run(wait_serving(ports))
            mesh_times.append(time.perf_counter() - t0)
            proc.terminate()
            proc.wait(30)
        ports = [free_port() for _ in SERVICES]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", BARE_UP, *map(str, ports)], stdout=subprocess.DEVNULL
        )
        asyncio.run(wait_serving(ports))
        bare_times.append(time.perf_counter() - t0)
        proc.kill()
        proc.wait()
    return mesh_times, bare_times


async def drive(
    port: int, calls: int, seconds: float, concurrency: int
) -> tuple[list[float], float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        req = auth_pb2.GetOpenIdConfigurationRequest()
        for _ in range(300):
            await stub.GetOpenIdConfiguration(req)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.GetOpenIdConfiguration(req)
            lat.append(time.perf_counter() - t0)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await stub.GetOpenIdConfiguration(req)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, done / (time.perf_counter() - t0)


def bench_rpc(mode: str, calls: int, seconds: float) -> tuple[list[float], float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, mode, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout and proc.stdout.readline().strip() == "ready"
        return asyncio.run(drive(port, calls, seconds, 32))
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--startup-runs", type=int, default=3)
    args = ap.parse_args()

    mesh_up, bare_up = time_startup(args.startup_runs)
    print("start-up to all 8 SERVING (s)")
    print(
        f"  autoecoops up     median {statistics.median(mesh_up):.3f}  runs {', '.join(f'{t:.3f}' for t in mesh_up)}"
    )
    print(
        f"  bare grpc.aio x8  median {statistics.median(bare_up):.3f}  runs {', '.join(f'{t:.3f}' for t in bare_up)}"
    )
    print(f"  ratio             {statistics.median(mesh_up) / statistics.median(bare_up):.2f}x")

    results = {}
    for mode in ("bare", "mesh", "bare", "mesh"):  # interleaved, to share the machine's noise
        lat, rps = bench_rpc(mode, args.calls, args.seconds)
        prev = results.get(mode)
        if prev is None or statistics.median(lat) < statistics.median(prev[0]):
            results[mode] = (lat, rps if prev is None else max(rps, prev[1]))
        else:
            results[mode] = (prev[0], max(rps, prev[1]))
    print("\nunary RPC, sequential latency (µs) and throughput with 32 concurrent callers")
    for mode, label in (("bare", "bare grpc.aio"), ("mesh", "mesh runtime")):
        lat, rps = results[mode]
        print(
            f"  {label:<14} p50 {pct(lat, 0.5) * 1e6:7.0f}  p99 {pct(lat, 0.99) * 1e6:7.0f}  {rps:8.0f} req/s"
        )
    (bl, brps), (ml, mrps) = results["bare"], results["mesh"]
    print(
        f"  ratio mesh/bare  p50 {pct(ml, 0.5) / pct(bl, 0.5):.2f}x  p99 {pct(ml, 0.99) / pct(bl, 0.99):.2f}x  "
        f"throughput {brps / mrps:.2f}x slower (target <= 1.3x)"
    )


if __name__ == "__main__":
    main()
