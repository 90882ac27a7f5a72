"""machine-ops agent sessions at fleet scale (issue #18), against a bare bidi stream.

One process opens N agent sessions (AgentSession, real tokens, real hello ->
Welcome) to a real `autoecoops serve machine-ops` process backed by real
auth-service, policy-audit and event-bus processes and Redis, then:

- sessions established per second (hello sent -> Welcome received, N concurrent);
- platform CPU per heartbeat (machine-ops' user+system CPU while every session
  sends H heartbeats, divided by N*H);
- memory per session (machine-ops' RSS growth from 0 to N open sessions, / N);
- inventory deltas ingested per second (every session sends D deltas; each is
  applied exactly once in Redis and acked).

The baseline is a bare grpc.aio server in its own process with one bidi
method that answers the first message and reads heartbeats: no auth, no
audit, no Redis. Same N sessions, same heartbeats, same measurements.
Node identities are minted from the test key ring (enrollment is a
one-time cost per node and not what this measures).

    .venv/bin/python bench/bench_machineops.py [--sessions 1000] [--heartbeats 5] [--deltas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis

from autoecoops.kernel.mesh.config import SERVICES, MeshConfig
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc
from autoecoops.platforms.machine_ops import convert

BIN = Path(sys.executable).parent
BARE_METHOD = "/bench.Bare/Session"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the baseline server ------------------------------------------------------------


async def bare_server(port: int) -> None:
    """A bidi stream that answers the first message (the Welcome) and reads the rest."""

    async def session(requests: Any, context: Any) -> Any:
        first = True
        async for raw in requests:
            msg = pb.AgentSessionRequest.FromString(raw)
            if first:
                first = False
                yield pb.AgentSessionResponse(welcome=pb.Welcome()).SerializeToString()
            elif msg.sequence:
                yield pb.AgentSessionResponse(ack=pb.Ack(sequence=msg.sequence)).SerializeToString()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Bare", {"Session": grpc.stream_stream_rpc_method_handler(session)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("SERVING in", flush=True)
    await server.wait_for_termination()


# -- processes -------------------------------------------------------------------------


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "SERVING in" in line:
            return proc
    proc.kill()
    raise SystemExit(f"{args} did not start")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out = ""
    return out or ""


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


# -- the measured client ------------------------------------------------------------------


class Session:
    """One agent session on its own channel (as each agent has its own connection)."""

    def __init__(self, channel: grpc.aio.Channel, call: Any) -> None:
        self.channel = channel
        self.call = call


async def open_sessions(
    addr: str, n: int, make: Any, concurrency: int = 200
) -> tuple[list[Session], float]:
    sem = asyncio.Semaphore(concurrency)
    sessions: list[Session] = []

    async def one(i: int) -> None:
        async with sem:
            channel = grpc.aio.insecure_channel(addr)
            call, hello = make(channel, i)
            await call.write(hello)
            first = await call.read()
            assert first is not grpc.aio.EOF and first.WhichOneof("message") == "welcome", first
            sessions.append(Session(channel, call))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return sessions, time.perf_counter() - t0


async def heartbeats(sessions: list[Session], h: int) -> None:
    beat = pb.AgentSessionRequest(heartbeat=pb.Heartbeat(send_time=convert.ts(time.time())))
    for _ in range(h):
        await asyncio.gather(*(s.call.write(beat) for s in sessions))


async def deltas(sessions: list[Session], d: int) -> float:
    async def one(i: int, s: Session) -> None:
        for k in range(1, d + 1):
            delta = pb.InventoryDelta(
                tables=[
                    pb.InventoryTable(
                        name="deb_packages",
                        rows=[pb.InventoryRow(columns={"name": "openssl", "version": f"3.0.{k}"})],
                    )
                ],
                collect_time=convert.ts(time.time()),
            )
            await s.call.write(pb.AgentSessionRequest(sequence=k, inventory=delta))
        got = 0
        while got < d:
            msg = await s.call.read()
            if msg is grpc.aio.EOF:
                raise RuntimeError("session ended")
            if msg.WhichOneof("message") == "ack":
                got += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    return time.perf_counter() - t0


async def close(sessions: list[Session]) -> None:
    for s in sessions:
        s.call.cancel()
    await asyncio.gather(*(s.channel.close() for s in sessions))


async def measure(
    proc: subprocess.Popen[str], addr: str, n: int, h: int, d: int, make: Any, with_deltas: bool
) -> dict[str, float]:
    p = psutil.Process(proc.pid)
    await asyncio.sleep(1.0)
    rss0 = p.memory_info().rss
    sessions, took = await open_sessions(addr, n, make)
    await asyncio.sleep(1.0)
    rss1 = p.memory_info().rss
    c0 = cpu(p)
    await heartbeats(sessions, h)
    await asyncio.sleep(1.5)  # let the server drain what is in flight
    c1 = cpu(p)
    out = {
        "sessions_per_s": n / took,
        "cpu_us_per_heartbeat": (c1 - c0) / (n * h) * 1e6,
        "kib_per_session": (rss1 - rss0) / n / 1024,
    }
    if with_deltas:
        out["deltas_per_s"] = n * d / await deltas(sessions, d)
    await close(sessions)
    return out


def seed_nodes(env: dict[str, str], n: int) -> Any:
    """Node records and node tokens for n bench nodes (identities minted from the key ring)."""
    from autoecoops.kernel.auth.keys import KeyRing
    from autoecoops.kernel.auth.settings import AuthSettings
    from autoecoops.kernel.auth.tokens import Issuer

    cfg = MeshConfig(data_dir=Path(env["AUTOECOOPS_DATA_DIR"]))
    s = AuthSettings.from_env(cfg, {})
    ring = KeyRing(s.key_dir, publish_delay=s.publish_delay, max_token_ttl=s.max_token_ttl)
    ring.load_or_create()
    issuer = Issuer(s.issuer, ring)
    r = redis.Redis.from_url(env["REDIS_URL"])
    key = env["AUTOECOOPS_KEY_PREFIX"] + "machine-ops:nodes"
    tokens = []
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        nid = f"bench-{i}"
        node = pb.Node(name=f"nodes/{nid}", identity=f"node.{nid}", etag="x")
        pipe.hset(key, nid, node.SerializeToString())
        tokens.append(
            issuer.issue(f"node.{nid}", s.audience, 3600, roles=["machineops-agent"]).token
        )
    pipe.execute()

    def make(channel: grpc.aio.Channel, i: int) -> tuple[Any, pb.AgentSessionRequest]:
        stub = machineops_pb2_grpc.MachineOpsServiceStub(channel)
        call = stub.AgentSession(metadata=[("authorization", f"Bearer {tokens[i]}")])
        hello = pb.AgentHello(
            node=f"nodes/bench-{i}", epoch=uuid.uuid4().hex, agent_version="bench"
        )
        return call, pb.AgentSessionRequest(hello=hello)

    return make


def bare_make(channel: grpc.aio.Channel, i: int) -> tuple[Any, pb.AgentSessionRequest]:
    call = channel.stream_stream(
        BARE_METHOD,
        request_serializer=pb.AgentSessionRequest.SerializeToString,
        response_deserializer=pb.AgentSessionResponse.FromString,
    )()
    return call, pb.AgentSessionRequest(hello=pb.AgentHello(node=f"nodes/bench-{i}", epoch="e"))


async def main(n: int, h: int, d: int) -> None:
    prefix = f"autoecoops-bench:{uuid.uuid4().hex[:8]}:"
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOECOOPS_")}
        for svc in SERVICES:
            env[f"AUTOECOOPS_{svc.env}_PORT"] = str(free_port())
        env.update(
            AUTOECOOPS_DATA_DIR=tmp,
            REDIS_URL=redis_url,
            AUTOECOOPS_KEY_PREFIX=prefix,
            AUTOECOOPS_LOG_LEVEL="WARNING",
            AUTOECOOPS_SHUTDOWN_GRACE_SECONDS="1",
            AUTOECOOPS_DRAIN_DELAY_SECONDS="0",
        )
        procs = [
            start([str(BIN / "autoecoops"), "serve", s], env)
            for s in ("auth-service", "policy-audit", "event-bus")
        ]
        mo = start([str(BIN / "autoecoops"), "serve", "machine-ops"], env)
        try:
            make = seed_nodes(env, n)
            addr = f"127.0.0.1:{env['AUTOECOOPS_MACHINE_OPS_PORT']}"
            ours = await measure(mo, addr, n, h, d, make, with_deltas=True)
        except BaseException:
            print(stop(mo)[-4000:], file=sys.stderr)
            raise
        finally:
            for p in [mo, *procs]:
                if p.poll() is None:
                    stop(p)
            r = redis.Redis.from_url(redis_url)
            keys = list(r.scan_iter(match=prefix + "*", count=1000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i : i + 1000])
    port = free_port()
    bare = start([sys.executable, __file__, "--bare-server", str(port)], dict(os.environ))
    try:
        base = await measure(bare, f"127.0.0.1:{port}", n, h, d, bare_make, with_deltas=False)
    finally:
        stop(bare)

    print(f"{n} agent sessions on loopback, {h} heartbeats each, {d} inventory deltas each")
    print(f"{'':28} {'machine-ops':>14} {'bare grpc.aio':>14} {'ratio':>8}")
    for key, label in (
        ("sessions_per_s", "sessions established / s"),
        ("cpu_us_per_heartbeat", "platform CPU / heartbeat us"),
        ("kib_per_session", "memory / session KiB"),
    ):
        ratio = ours[key] / base[key] if base[key] else float("inf")
        print(f"{label:28} {ours[key]:14.1f} {base[key]:14.1f} {ratio:8.2f}x")
    print(f"{'inventory deltas ingested / s':28} {ours['deltas_per_s']:14.1f} {'-':>14}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--heartbeats", type=int, default=5)
    parser.add_argument("--deltas", type=int, default=3)
    parser.add_argument("--bare-server", type=int, default=0, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.bare_server:
        asyncio.run(bare_server(a.bare_server))
    else:
        asyncio.run(main(a.sessions, a.heartbeats, a.deltas))
