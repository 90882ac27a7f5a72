"""policy-audit benchmarks (issue #6). Needs a Redis ($REDIS_URL or 127.0.0.1:6379).

1. Evaluate p50/p99 for the shipped deploy policy, through the service's
   domain path (bundle lookup, identity, decision id, decision log into the
   audit trail's group commit) vs a bare regopy query of the same compiled
   policy in the same run. Target <= 1.3x bare.
2. AppendEntry throughput with 1 and 32 concurrent writers, through the store
   (the AuditLog the servicer calls) and through gRPC (the servicer on a
   grpc.aio server in this process; no auth interceptor), vs a bare grpc.aio
   unary RPC that answers at once, 32 writers, same run. Target >= 0.8x bare.
   Then BatchAppendEntries (500 entries a call). Target >= 5,000 entries/s.
3. Inclusion-proof latency in a log of 1M entries (built with pipelined
   writes). Target <= 2 ms.
4. `audit verify` of the 1M entries vs hashing the same bytes with hashlib alone.

    .venv/bin/python bench/bench_policy_audit.py [--entries 1000000] [--evals 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import redis.asyncio as aioredis
from regopy import Interpreter, LogLevel  # type: ignore[import-untyped]

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.outbox import Outbox, Relay
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.bundles import BundleRegistry, load_dir
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteSigner
from autoecoops.kernel.policy_audit.config import SHIPPED_POLICIES
from autoecoops.kernel.policy_audit.decisions import Decider, DecisionLogger
from autoecoops.kernel.policy_audit.store import CHUNK_BITS, AuditStore
from autoecoops.kernel.policy_audit.trail import AuditLog
from autoecoops.kernel.policy_audit.verify import verify

ORIGIN = "bench.autoecoops/audit"
PATH = "autoecoops/deploy/decision"
INPUT = {
    "identity": {"sub": "bob", "roles": ["deployer"], "groups": ["team-web", "oncall"]},
    "action": "deploy",
    "target": {"environment": "production", "namespace": "web", "cluster": "prod-eu-1"},
    "change": {
        "author": "bob",
        "approvers": ["alice"],
        "risk": "low",
        "kind": "Deployment",
        "images": ["registry.example/web:1.42.0"],
    },
    "credentials": {"token": "redacted-by-mask"},
}


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def fmt_ms(x: float) -> str:
    return f"{x * 1e3:.3f} ms"


async def cleanup(r: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in r.scan_iter(match=prefix + "*", count=10_000)]
    for at in range(0, len(keys), 1000):
        await r.unlink(*keys[at : at + 1000])


def entry(n: int) -> audit_pb2.AuditEntry:
    e = audit_pb2.AuditEntry(
        type="deployment.applied",
        service="iaops",
        action="deployments.create",
        resource=f"iaops/deployments/web-{n}",
        outcome=audit_pb2.OUTCOME_SUCCESS,
        trace_id=uuid.uuid4().hex,
    )
    e.actor.subject = "bob"
    e.details.update({"environment": "production", "approvers": ["alice"], "n": n})
    return e


# -- 1. Evaluate ---------------------------------------------------------------


async def bench_evaluate(r: aioredis.Redis, prefix: str, n: int) -> None:
    spec = load_dir(SHIPPED_POLICIES, "platform", source="shipped:")
    registry = BundleRegistry(r, prefix + "policy-audit")
    await registry.create(spec)
    signer = NoteSigner.generate(ORIGIN)
    audit = AuditLog(AuditStore(r, prefix + "policy-audit:{audit}"), signer, ORIGIN)

    async def local(reqs: Any) -> list[int]:
        got = await audit.append_many([(q.entry, q.request_id) for q in reqs])
        return [a.index for a in got]

    # The service's path: each decision committed to policy-audit's outbox,
    # the relay appending them to the log in groups in the background.
    relay = Relay(local)
    outbox = Outbox(r, prefix + "policy-audit:outbox", relay)
    logger = DecisionLogger(audit, outbox)
    decider = Decider(registry, logger)

    bare = Interpreter()
    bare.log_level = LogLevel.NONE
    for path, source in spec.modules:
        bare.add_module(path, source)
    bare.add_data(dict(spec.data))
    plan = bare.build(None, [PATH])
    runner = Interpreter()
    adhoc = Interpreter()
    for path, source in spec.modules:
        adhoc.add_module(path, source)
    adhoc.add_data(dict(spec.data))

    def bare_call() -> Any:
        runner.set_input(INPUT)
        return runner.query_bundle_entrypoint(plan, PATH).results[0].expressions[0]

    def adhoc_call() -> Any:
        adhoc.set_input(INPUT)
        return adhoc.query("data.autoecoops.deploy.decision").results[0].expressions[0]

    assert bare_call() == (await decider.evaluate(PATH, INPUT)).decision.value

    async def ours() -> None:
        await decider.evaluate(PATH, INPUT)

    def timed_sync(fn: Callable[[], Any], count: int) -> list[float]:
        out = []
        for _ in range(count):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    async def timed_async(fn: Callable[[], Awaitable[None]], count: int) -> list[float]:
        out = []
        for _ in range(count):
            t = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0)  # let the decision logger run between calls, as a server would
        return out

    # Interleave rounds so drift (other processes, CPU frequency) hits both alike.
    b_lat: list[float] = []
    o_lat: list[float] = []
    a_lat: list[float] = []
    for _ in range(5):
        b_lat += timed_sync(bare_call, n // 5)
        o_lat += await timed_async(ours, n // 5)
        a_lat += timed_sync(adhoc_call, max(1, n // 25))
    t = time.perf_counter()
    assert await relay.flush(within=60.0)
    flush = time.perf_counter() - t
    size = await audit.size()
    print("\n== 1. Evaluate (shipped deploy policy, path autoecoops/deploy/decision)")
    print(
        f"  bare regopy, prepared entrypoint  p50 {fmt_ms(pct(b_lat, 50))}  p99 {fmt_ms(pct(b_lat, 99))}"
    )
    print(
        f"  bare regopy, ad-hoc query()       p50 {fmt_ms(pct(a_lat, 50))}  p99 {fmt_ms(pct(a_lat, 99))}"
    )
    print(
        f"  policy-audit Evaluate (domain)    p50 {fmt_ms(pct(o_lat, 50))}  p99 {fmt_ms(pct(o_lat, 99))}"
    )
    print(
        f"  ratio to bare prepared: p50 {pct(o_lat, 50) / pct(b_lat, 50):.2f}x  "
        f"p99 {pct(o_lat, 99) / pct(b_lat, 99):.2f}x  (target <= 1.3x)"
    )
    print(
        f"  decisions logged: {size} of {n} in the audit trail ({flush * 1e3:.0f} ms to flush the rest)"
    )
    await relay.close()
    await audit.close()


# -- 2. AppendEntry ------------------------------------------------------------


async def run_writers(append: Callable[[int], Awaitable[Any]], writers: int, total: int) -> float:
    per = total // writers

    async def writer(w: int) -> None:
        for i in range(per):
            await append(w * per + i)

    t = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return writers * per / (time.perf_counter() - t)


async def bench_append(r: aioredis.Redis, prefix: str, total: int) -> None:
    signer = NoteSigner.generate(ORIGIN)
    entries = [entry(i) for i in range(total * 2)]
    print("\n== 2. AppendEntry throughput (synchronous: each append returns once stored)")
    bare_server_, bare_stub = await bare_server()

    async def bare_append(i: int) -> Any:
        return await bare_stub.AppendEntry(
            audit_pb2.AppendEntryRequest(entry=entries[i], request_id=uuid.uuid4().hex)
        )

    await run_writers(bare_append, 32, 400)
    print(
        f"  bare grpc.aio unary RPC (same request, answered at once), 32 writers "
        f"{await run_writers(bare_append, 32, total // 2):>8,.0f} calls/s  (baseline)"
    )
    for via in ("store", "gRPC"):
        for writers in (1, 32):
            base = f"{prefix}{via}{writers}:policy-audit:{{audit}}"
            audit = AuditLog(AuditStore(r, base), signer, ORIGIN)
            server = None
            if via == "store":

                async def append(i: int, audit: AuditLog = audit) -> Any:
                    return await audit.append(entries[i], uuid.uuid4().hex)
            else:
                server, stub = await grpc_server(audit, signer)

                async def append(i: int, stub: Any = stub) -> Any:
                    return await stub.AppendEntry(
                        audit_pb2.AppendEntryRequest(entry=entries[i], request_id=uuid.uuid4().hex)
                    )

            count = total if writers == 32 else total // 4
            await run_writers(append, writers, min(count, 400))  # warm up
            ratio = ""
            if via == "gRPC" and writers == 32:
                # Interleaved with the bare RPC, round by round, so load from
                # elsewhere on the machine hits both alike.
                ours, theirs = [], []
                for _ in range(3):
                    theirs.append(await run_writers(bare_append, 32, count // 3))
                    ours.append(await run_writers(append, writers, count // 3))
                rate, bare_rate = sum(ours) / 3, sum(theirs) / 3
                ratio = (
                    f"  vs bare grpc.aio {bare_rate:,.0f}/s in the same rounds: "
                    f"{rate / bare_rate:.2f}x (target >= 0.8x)"
                )
            else:
                rate = await run_writers(append, writers, count)
            size = await audit.size()
            print(
                f"  {via:<5} {writers:>2} writer{'s' if writers > 1 else ' '}  {rate:>8,.0f} entries/s"
                f"  ({audit.commits} group commits, {size} entries){ratio}"
            )
            if server is not None:
                await server.stop(0)
            await audit.close()
            await cleanup(r, f"{prefix}{via}{writers}:")

    await bare_server_.stop(0)

    # BatchAppendEntries: producers with many entries (outbox relays).
    audit = AuditLog(AuditStore(r, f"{prefix}batch:policy-audit:{{audit}}"), signer, ORIGIN)
    server, stub = await grpc_server(audit, signer)
    size = 500

    async def batch(i: int) -> Any:
        return await stub.BatchAppendEntries(
            audit_pb2.BatchAppendEntriesRequest(
                requests=[
                    audit_pb2.AppendEntryRequest(entry=entries[j], request_id=uuid.uuid4().hex)
                    for j in range(i * size % len(entries), i * size % len(entries) + size)
                    if j < len(entries)
                ]
            )
        )

    calls = max(8, total // size)
    await run_writers(batch, 4, 8)
    rate = await run_writers(batch, 4, calls) * size
    print(
        f"  gRPC BatchAppendEntries ({size} a call, 4 callers) {rate:>8,.0f} entries/s"
        f"  ({audit.commits} group commits)  target >= 5,000/s"
    )
    await server.stop(0)
    await audit.close()
    await cleanup(r, f"{prefix}batch:")


async def bare_server() -> tuple[grpc.aio.Server, Any]:
    """The same unary method on a bare grpc.aio server whose handler answers at once."""

    class Bare(audit_pb2_grpc.AuditServiceServicer):
        async def AppendEntry(self, request: Any, context: Any) -> Any:
            return audit_pb2.AppendEntryResponse(index=1)

    server = grpc.aio.server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, audit_pb2_grpc.AuditServiceStub(channel)


async def grpc_server(audit: AuditLog, signer: NoteSigner) -> tuple[grpc.aio.Server, Any]:
    from autoecoops.kernel.policy_audit.service import AuditServicer

    class App:
        pass

    app: Any = App()
    app.audit, app.signer = audit, signer
    server = grpc.aio.server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(app), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, audit_pb2_grpc.AuditServiceStub(channel)


# -- 3 and 4. A million entries --------------------------------------------------


def template_entry(i: int) -> bytes:
    """Canonical JSON of a realistic entry, written directly (keys already sorted)."""
    idx = f'"index":"{i}",' if i else ""
    return (
        f'{{"action":"deployments.create","actor":{{"subject":"user-{i % 97}"}},'
        f'"details":{{"approvers":["alice"],"environment":"production","n":{i}}},{idx}'
        f'"outcome":"OUTCOME_SUCCESS","resource":"iaops/deployments/web-{i}","service":"iaops",'
        f'"time":"2025-01-01T00:00:00Z","traceId":"{i:032x}","type":"deployment.applied"}}'
    ).encode()


async def build_log(
    r: aioredis.Redis, base: str, n: int, signer: NoteSigner
) -> tuple[CheckpointBody, list[bytes]]:
    """Write n entries with pipelined XADD and APPEND (no Lua per entry)."""
    store = AuditStore(r, base)
    frontier = merkle.Frontier()
    datas: list[bytes] = []
    chunk_nodes: dict[str, list[bytes]] = {}
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        data = template_entry(i)
        datas.append(data)
        for (level, index), h in frontier.append(merkle.leaf_hash(data)):
            chunk_nodes.setdefault(store.tree_key(level, index), []).append(h)
        pipe.xadd(store.entries_key, {"e": data}, id=f"{i}-1")
        if len(pipe) >= 20_000:
            await pipe.execute()
    for key, hashes in chunk_nodes.items():
        pipe.append(key, b"".join(hashes))
    body = CheckpointBody(ORIGIN, n, frontier.root())
    note = signer.sign(body.text())
    pipe.hset(
        store.head_key,
        mapping={
            "size": n,
            "note": note,
            "time_ns": time.time_ns(),
            "vkey": signer.verifier.vkey(),
        },
    )
    await pipe.execute()
    assert 1 << CHUNK_BITS  # nodes are chunked, so no string nears Redis's 512 MB limit
    return body, datas


async def bench_million(r: aioredis.Redis, prefix: str, n: int, proofs: int) -> None:
    signer = NoteSigner.generate(ORIGIN)
    base = f"{prefix}big:policy-audit:{{audit}}"
    print(f"\n== 3. Inclusion proofs in a log of {n:,} entries")
    t = time.perf_counter()
    body, datas = await build_log(r, base, n, signer)
    print(f"  built with pipelined writes in {time.perf_counter() - t:.1f} s")
    audit = AuditLog(AuditStore(r, base), signer, ORIGIN)
    rng = random.Random(6962)
    lat = []
    for _ in range(proofs):
        i = rng.randrange(n)
        t = time.perf_counter()
        size, proof = await audit.inclusion_proof(i, n)
        lat.append(time.perf_counter() - t)
        assert merkle.verify_inclusion(i, size, merkle.leaf_hash(datas[i]), proof, body.root_hash)
    print(
        f"  GetInclusionProof (store, {len(proof)} hashes)  p50 {fmt_ms(pct(lat, 50))}  "
        f"p99 {fmt_ms(pct(lat, 99))}  (target <= 2 ms)"
    )

    print(f"\n== 4. audit verify of {n:,} entries")
    t = time.perf_counter()
    for d in datas:
        hashlib.sha256(d).digest()
    baseline = time.perf_counter() - t
    t = time.perf_counter()
    result = await verify(audit.store, body)
    took = time.perf_counter() - t
    assert result.ok, result.findings
    total = sum(map(len, datas))
    print(f"  hashlib.sha256 over the same {total / 1e6:.0f} MB in memory   {baseline:.2f} s")
    print(
        f"  verify (read from Redis, leaf + tree hashes)  {took:.2f} s  ({took / baseline:.1f}x hashlib alone)"
    )
    await cleanup(r, f"{prefix}big:")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--evals", type=int, default=5000)
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    r = aioredis.Redis.from_url(url)
    prefix = f"bench-policy-audit:{uuid.uuid4().hex[:8]}:"
    try:
        await bench_evaluate(r, prefix, args.evals)
        await bench_append(r, prefix, args.appends)
        await bench_million(r, prefix, args.entries, args.proofs)
    finally:
        await cleanup(r, prefix)
        await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
