"""memory-hub benchmarks (issue #7).

1. Ingest throughput: documents through ``MemoryHub.ingest`` (parse, chunk
   with the model's tokenizer, embed, one atomic Redis commit per batch)
   against a raw ``model.encode`` of exactly the same chunk texts, in the same
   run. Target: >= 0.8x raw.
2. Search at 100k chunks with HNSW: p50/p99 of one query, with the query's
   embedding excluded (index search only) and included (model.encode of the
   query text, then the search), against exact search on the same data.
   Target: p99 <= 10 ms excluded. The 100k vectors are SYNTHETIC: normalised
   384-d vectors drawn around 2,000 random centres (embeddings cluster by
   topic; uniform noise would be an unrealistically hard case for HNSW), so
   the benchmark does not spend minutes embedding 100k texts.
3. Recall@10 of HNSW against exact search on the same data. Target: >= 0.95.
4. Memory per 100k chunks: the faiss index (HNSW and flat), measured as its
   serialized size, and the process RSS growth while building it.

    .venv/bin/python bench/bench_memory_hub.py [--docs 512] [--chunks 100000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from autoecoops.kernel.memory_hub.chunking import chunk_text
from autoecoops.kernel.memory_hub.embedder import Embedder, load_model
from autoecoops.kernel.memory_hub.hub import DocumentInput, MemoryHub
from autoecoops.kernel.memory_hub.index import FLAT, HNSW, DenseIndex, IndexPolicy
from autoecoops.kernel.memory_hub.parsing import Format
from autoecoops.kernel.memory_hub.settings import DEFAULT_MODEL, MemoryHubSettings
from autoecoops.kernel.memory_hub.store import MemoryStore
from autoecoops.kernel.mesh.redis import EmbeddedRedis, connect

SUBJECTS = ["the kubelet", "etcd", "CoreDNS", "the ingress", "Postgres", "Kafka", "Redis", "Vault"]
SYMPTOMS = ["restarts", "times out", "runs out of memory", "returns 502", "lags", "is sealed"]
ACTIONS = [
    "Check the logs of the affected pods and compare them with the last deploy.",
    "Scale the deployment up and watch the error rate on the dashboard.",
    "Roll back the release with helm rollback if the change is recent.",
    "Page the owning team when the alert fires for more than ten minutes.",
    "Drain the node, patch it, reboot it and uncordon it again.",
]


def documents(n: int) -> list[str]:
    """Runbook-like Markdown documents of a few paragraphs each (one to two chunks)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        s, y = SUBJECTS[i % len(SUBJECTS)], SYMPTOMS[(i // 8) % len(SYMPTOMS)]
        steps = " ".join(ACTIONS[j] for j in rng.permutation(len(ACTIONS))[:4])
        out.append(
            f"# Runbook {i}: {s} {y}\n\nWhen {s} {y} on cluster {i % 17}, users see errors. "
            f"{steps}\n\n## Notes\n\nTicket INC-{1000 + i}. {steps}"
        )
    return out


def redis_url() -> tuple[str, EmbeddedRedis | None]:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url, None
    except redis.RedisError:
        embedded = EmbeddedRedis(Path(tempfile.mkdtemp()))
        return embedded.start(), embedded


async def bench_ingest(n_docs: int, batch: int) -> None:
    settings = MemoryHubSettings()
    path = settings.models[DEFAULT_MODEL]
    model = load_model(path)
    emb = Embedder(DEFAULT_MODEL, path, settings.batch_size)
    texts = documents(n_docs)
    # The raw baseline encodes exactly the texts the hub will embed.
    chunk_texts = [
        c.embed_text
        for t in texts
        for c in chunk_text(
            t,
            markdown=True,
            max_tokens=settings.chunk_tokens,
            overlap=settings.chunk_overlap,
            offsets=emb.offsets(t),
            count_tokens=emb.count,
        )
    ]
    model.encode(chunk_texts[:64], batch_size=settings.batch_size)  # warm up
    t0 = time.perf_counter()
    model.encode(chunk_texts, batch_size=settings.batch_size, normalize_embeddings=True)
    raw = time.perf_counter() - t0

    url, embedded = redis_url()
    client = connect(url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:memory-hub"
    hub = MemoryHub(MemoryStore(client, prefix), settings, Path(tempfile.mkdtemp()))
    try:
        await hub.create_namespace("bench")
        docs = [
            DocumentInput(f"doc-{i}", t.encode(), Format.MARKDOWN, metadata={"i": i}, path="d")
            for i, t in enumerate(texts)
        ]
        inner = hub.embedder(DEFAULT_MODEL)
        encode, spent = inner.encode, [0.0]

        def timed_encode(texts: list[str]) -> np.ndarray:
            t = time.perf_counter()
            try:
                return encode(texts)
            finally:
                spent[0] += time.perf_counter() - t

        inner.encode = timed_encode  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for i in range(0, len(docs), batch):
            await hub.ingest("bench", docs[i : i + batch])
        took = time.perf_counter() - t0
        inner.encode = encode  # type: ignore[method-assign]
        meta = await hub.store.require("bench")
        assert meta.chunk_count == len(chunk_texts), (meta.chunk_count, len(chunk_texts))
        t0 = time.perf_counter()
        for i in range(0, len(docs), batch):
            await hub.ingest("bench", docs[i : i + batch])
        unchanged = time.perf_counter() - t0
    finally:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
        await client.aclose()
        if embedded is not None:
            embedded.stop()
    n = len(chunk_texts)
    print(f"ingest: {n_docs} documents, {n} chunks, batches of {batch} documents")
    print(f"  raw model.encode      {n / raw:8.1f} chunks/s  ({raw:.2f} s)")
    print(
        f"  MemoryHub.ingest      {n / took:8.1f} chunks/s  ({took:.2f} s, of which "
        f"{spent[0]:.2f} s in model.encode)"
    )
    print(f"  ratio ingest/raw      {raw / took:8.2f}x  (target >= 0.80)")
    print(f"  re-ingest unchanged   {n_docs / unchanged:8.1f} documents/s (nothing re-embedded)")


def clustered(n: int, dim: int, centres: int, noise_seed: int) -> np.ndarray:
    """Normalised points in a two-level topic structure: 1/10 as many broad
    topics as ``centres``, each subtopic near its topic, each point near its
    subtopic. Neighbours thus come at every distance, as with real
    embeddings, rather than in tight, far-apart clusters that make any index
    look perfect. The topics are the same for every call."""
    rng = np.random.default_rng(1)

    def unit(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def noise(r: np.random.Generator, k: int) -> np.ndarray:
        return r.standard_normal((k, dim)).astype(np.float32) / np.sqrt(dim)

    topics = unit(noise(rng, max(centres // 10, 1)))
    subs = unit(topics[rng.integers(0, len(topics), centres)] + 0.8 * noise(rng, centres))
    pts = np.random.default_rng(noise_seed)
    x = unit(subs[pts.integers(0, centres, n)] + 0.7 * noise(pts, n))
    return np.ascontiguousarray(x, dtype=np.float32)


def pct(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(p / 100 * len(values)))]


def rss_mb() -> float:
    """The current resident set size (not the peak, which the model load set)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_search(n: int, n_queries: int) -> None:
    settings = MemoryHubSettings()
    dim = 384
    policy = IndexPolicy(
        hnsw_threshold=settings.hnsw_threshold,
        m=settings.hnsw_m,
        ef_construction=settings.hnsw_ef_construction,
        ef_search=settings.hnsw_ef_search,
    )
    data = clustered(n, dim, 2000, noise_seed=2)
    labels = np.arange(1, n + 1, dtype=np.int64)
    queries = clustered(n_queries, dim, 2000, noise_seed=3)  # same topics, new points
    before = rss_mb()
    t0 = time.perf_counter()
    hnsw = DenseIndex.build(dim, policy, labels, data, HNSW)
    build = time.perf_counter() - t0
    grown = rss_mb() - before
    flat = DenseIndex.build(dim, policy, labels, data, FLAT)

    def timed(index: DenseIndex) -> tuple[list[float], list[list[int]]]:
        lat, out = [], []
        for q in queries:
            t = time.perf_counter()
            got, _ = index.search(q, 10)
            lat.append((time.perf_counter() - t) * 1000)
            out.append(got.tolist())
        return lat, out

    timed(hnsw)  # warm up
    h_lat, h_res = timed(hnsw)
    f_lat, f_res = timed(flat)
    recall = sum(len(set(a) & set(b)) for a, b in zip(h_res, f_res, strict=True)) / (
        10 * len(queries)
    )

    model = load_model(settings.models[DEFAULT_MODEL])
    texts = [
        f"why does {s} {y} on cluster {i}"
        for i, (s, y) in enumerate(zip(SUBJECTS * 40, SYMPTOMS * 60, strict=False))
    ]
    model.encode(texts[:8])
    inc: list[float] = []
    for i in range(min(300, n_queries)):
        t = time.perf_counter()
        model.encode([texts[i % len(texts)]], normalize_embeddings=True)
        hnsw.search(queries[i], 10)
        inc.append((time.perf_counter() - t) * 1000)

    print(f"search: {n} chunks, 384-d synthetic clustered vectors, {len(queries)} queries, k=10")
    print(f"  HNSW (M={policy.m}, efConstruction={policy.ef_construction}) built in {build:.1f} s")
    print(
        f"  HNSW efSearch={policy.ef_search}, embedding excluded: p50 {statistics.median(h_lat):.3f} ms, "
        f"p99 {pct(h_lat, 99):.3f} ms  (target p99 <= 10 ms)"
    )
    print(
        f"  exact (flat),   embedding excluded: p50 {statistics.median(f_lat):.3f} ms, p99 {pct(f_lat, 99):.3f} ms"
    )
    print(f"  ratio exact/HNSW p50 {statistics.median(f_lat) / statistics.median(h_lat):.1f}x")
    print(
        f"  HNSW, embedding included (all-MiniLM-L6-v2 on CPU): p50 {statistics.median(inc):.2f} ms, "
        f"p99 {pct(inc, 99):.2f} ms"
    )
    print(f"  recall@10 HNSW vs exact: {recall:.4f}  (target >= 0.95)")
    per = 100_000 / n
    print(
        f"  memory per 100k chunks: HNSW index {hnsw.memory_bytes() * per / 2**20:.0f} MiB, "
        f"flat index {flat.memory_bytes() * per / 2**20:.0f} MiB, vectors alone "
        f"{n * dim * 4 * per / 2**20:.0f} MiB; RSS grew {grown * per:.0f} MiB building HNSW"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(bench_ingest(args.docs, args.batch))
    bench_search(args.chunks, args.queries)


if __name__ == "__main__":
    main()
