"""memory-hub replica convergence (issue #21): how long after an ingest through
replica A is the document searchable through replica B, and a delete through A
gone from B.

Two ``MemoryHub`` instances (two replicas, as two processes would run them,
here in one process sharing the loaded model) on one Redis and key prefix,
each with its own faiss index. A replica applies the namespace's change
stream before every search, so B needs no background poll to see A's write:
the first search after the ingest answers with it. Measured per document:

- baseline: ingest through A, then search through A until it is found (the
  local ingest -> searchable time, i.e. one search);
- replica: ingest through A, then search through B until it is found (B also
  applies the change: reads the chunk, its vector and the document, adds to
  its index);
- delete: delete through A, then search through B until it is gone.

Each is timed from the moment the ingest (delete) call returned, and printed
as p50/p99 with the ratio replica/baseline. The replica's time includes the
searches that did not find the document yet (none are expected).

    .venv/bin/python bench/bench_memory_hub_replicas.py [--docs 200] [--background 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from autoecoops.kernel.memory_hub.hub import DocumentInput, MemoryHub
from autoecoops.kernel.memory_hub.parsing import Format
from autoecoops.kernel.memory_hub.search import Query
from autoecoops.kernel.memory_hub.settings import MemoryHubSettings
from autoecoops.kernel.memory_hub.store import MemoryStore
from autoecoops.kernel.mesh.redis import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory_hub import documents, redis_url

BOUND = 30.0  # seconds: a document not searchable through B by then is a failure


def doc(doc_id: str, text: str) -> DocumentInput:
    """A Markdown document."""
    return DocumentInput(doc_id, text.encode(), Format.MARKDOWN, path=doc_id)


def unique(i: int) -> str:
    """A document only a search for its own code finds first."""
    code = f"zq{uuid.uuid4().hex[:10]}"
    return f"# Incident {code}\n\nIncident {code} number {i}: the {code} pager fired twice."


async def until(hub: MemoryHub, text: str, doc_id: str, present: bool) -> tuple[float, int]:
    """Seconds until ``doc_id`` is (or is no longer) the top hit for ``text``; searches made."""
    t0, searches = time.perf_counter(), 0
    while True:
        hits = await hub.search("bench", Query(text, 3))
        searches += 1
        found = any(h.chunk.doc_id == doc_id for h in hits)
        if found == present:
            return time.perf_counter() - t0, searches
        if time.perf_counter() - t0 > BOUND:
            raise RuntimeError(f"{doc_id} not {'found' if present else 'gone'} in {BOUND}s")
        await asyncio.sleep(0)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile, in milliseconds."""
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(n_docs: int, background: int) -> None:
    settings = MemoryHubSettings()
    url, embedded = redis_url()
    client_a, client_b = connect(url), connect(url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:memory-hub"
    a = MemoryHub(MemoryStore(client_a, prefix), settings, Path(tempfile.mkdtemp()))
    b = MemoryHub(MemoryStore(client_b, prefix), settings, Path(tempfile.mkdtemp()))
    try:
        await a.create_namespace("bench")
        bulk = documents(background)
        for i in range(0, len(bulk), 64):
            await a.ingest("bench", [doc(f"bg-{j}", t) for j, t in enumerate(bulk[i : i + 64], i)])
        # Both replicas loaded and warm (model, indexes) before timing.
        await a.search("bench", Query("warm up", 3))
        await b.search("bench", Query("warm up", 3))
        base, repl, gone, extra = [], [], [], 0
        for i in range(n_docs):
            text = unique(i)
            code = text.split()[2]
            await a.ingest("bench", [doc(f"local-{i}", text)])
            took, _ = await until(a, code, f"local-{i}", True)
            base.append(took)
            text = unique(i)
            code = text.split()[2]
            await a.ingest("bench", [doc(f"remote-{i}", text)])
            took, searches = await until(b, code, f"remote-{i}", True)
            repl.append(took)
            extra += searches - 1
            await a.delete_document("bench", f"remote-{i}")
            took, searches = await until(b, code, f"remote-{i}", False)
            gone.append(took)
            extra += searches - 1
        chunks = (await a.store.require("bench")).chunk_count
        print(f"memory-hub replicas: {n_docs} documents, namespace of {chunks} chunks, one Redis")
        print(f"{'':38} {'p50 ms':>8} {'p99 ms':>8}")
        rows = [
            ("baseline: ingest A -> searchable via A", base),
            ("replica:  ingest A -> searchable via B", repl),
            ("replica:  delete A -> gone via B", gone),
        ]
        for label, values in rows:
            print(f"{label:38} {pct(values, 50):8.2f} {pct(values, 99):8.2f}")
        print(
            f"ratio replica/baseline: p50 {statistics.median(repl) / statistics.median(base):.2f}x,"
            f" p99 {pct(repl, 99) / pct(base, 99):.2f}x"
        )
        print(f"searches through B that missed a finished write: {extra} (expected 0)")
    finally:
        for hub in (a, b):
            await hub.close()
        async for key in client_a.scan_iter(match=f"{prefix}*", count=1000):
            await client_a.delete(key)
        await client_a.aclose()
        await client_b.aclose()
        if embedded is not None:
            embedded.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200, help="documents timed")
    parser.add_argument("--background", type=int, default=500, help="documents already there")
    args = parser.parse_args()
    asyncio.run(run(args.docs, args.background))


if __name__ == "__main__":
    main()
