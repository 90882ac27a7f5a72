"""memory-hub's use cases on a real Redis with the real model: ingest, upsert,
delete, filters, restart persistence, snapshot staleness and two replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format

from autoecoops.kernel.memory_hub.filters import compile_filter
from autoecoops.kernel.memory_hub.hub import DocumentInput, MemoryHub
from autoecoops.kernel.memory_hub.index import HNSW
from autoecoops.kernel.memory_hub.parsing import Format
from autoecoops.kernel.memory_hub.search import Mode, Query
from autoecoops.kernel.mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from autoecoops.memory.v1 import memory_pb2
from tests.integration.memory_hub.conftest import MakeHub
from tests.unit.memory_hub.samples import make_pdf

RUNBOOK = b"""# Disk pressure on a node

The kubelet evicts pods when the node's disk is nearly full.

## Steps

- Check usage with df -h on the node.
- Prune unused images with crictl rmi --prune.
- Rotate or truncate the logs under /var/log/pods.
"""

HTML = b"""<html><head><title>TLS rotation</title></head><body>
<h1>Certificate rotation</h1><p>cert-manager renews TLS certificates 30 days before expiry.
If a certificate expired, delete the secret and let cert-manager issue a new one.</p></body></html>"""


def doc(doc_id: str, raw: bytes, fmt: Format = Format.MARKDOWN, **meta: Any) -> DocumentInput:
    return DocumentInput(doc_id, raw, fmt, metadata=meta, path=f"documents[{doc_id}]")


def where(**spec: Any) -> Any:
    key, value = next(iter(spec.items()))
    return compile_filter(
        json_format.ParseDict({"field": {"key": key, "eq": value}}, memory_pb2.Filter())
    )


async def ids(hub: MemoryHub, ns: str, text: str, k: int = 10, **kw: Any) -> list[str]:
    hits = await hub.search(ns, Query(text, k, **kw))
    return list(dict.fromkeys(h.chunk.doc_id for h in hits))


class CountingEncode:
    """Wraps an embedder's encode to count the texts it is given."""

    def __init__(self, hub: MemoryHub, model: str = "all-MiniLM-L6-v2") -> None:
        self.emb = hub.embedder(model)
        self.inner = self.emb.encode
        self.texts: list[str] = []
        self.emb.encode = self  # type: ignore[method-assign]

    def __call__(self, texts: Any) -> Any:
        self.texts += list(texts)
        return self.inner(texts)


async def test_ingest_all_formats_then_search_every_mode(make_hub: MakeHub) -> None:
    hub = await make_hub()
    ns = await hub.create_namespace("ops", max_tokens=64, overlap_tokens=8)
    assert (ns.model, ns.dimensions, ns.max_tokens, ns.overlap_tokens) == (
        "all-MiniLM-L6-v2",
        384,
        64,
        8,
    )
    pdf = make_pdf("Etcd backups run nightly at 02:00.", "Restore with etcdctl snapshot restore.")
    results = await hub.ingest(
        "ops",
        [
            doc("runbook", RUNBOOK, team="node", severity=2),
            doc("tls", HTML, Format.HTML, team="security"),
            doc("etcd", pdf, Format.PDF, team="platform"),
        ],
    )
    assert [(r.document_id, r.skipped_unchanged) for r in results] == [
        ("runbook", False),
        ("tls", False),
        ("etcd", False),
    ]
    assert all(r.chunk_count >= 1 and r.content_hash.startswith("sha256:") for r in results)
    record, chunks = await hub.document("ops", "tls", True)
    assert record.title == "TLS rotation"  # from <title>
    assert chunks[0].text.startswith("# Certificate rotation")
    for mode in Mode:
        assert (await ids(hub, "ops", "renew an expired TLS certificate", 3, mode=mode))[0] == "tls"
    hits = await hub.search("ops", Query("how do I restore etcd from a backup", 1))
    top = hits[0]
    assert top.chunk.doc_id == "etcd" and top.doc.metadata == {"team": "platform"}
    assert 0 < top.score <= 1 and 0 < top.dense <= 1
    # Offsets cite the extracted text exactly.
    _, etcd_chunks = await hub.document("ops", "etcd", True)
    full = "Etcd backups run nightly at 02:00.\n\nRestore with etcdctl snapshot restore."
    assert [full[c.start : c.end] for c in etcd_chunks] == [c.text for c in etcd_chunks]


async def test_upsert_replaces_chunks_and_never_reembeds_unchanged_content(
    make_hub: MakeHub,
) -> None:
    hub = await make_hub()
    await hub.create_namespace("ops", max_tokens=40, overlap_tokens=0)
    counter = CountingEncode(hub)
    sections = [f"## Part {i}\n\nStep {i}: restart the worker pool number {i}." for i in range(4)]
    first = await hub.ingest("ops", [doc("guide", "\n\n".join(sections).encode(), tier="a")])
    assert first[0].chunk_count == 4 and len(counter.texts) == 4
    # The same content again: nothing embedded, nothing written.
    again = await hub.ingest("ops", [doc("guide", "\n\n".join(sections).encode(), tier="a")])
    assert again[0].skipped_unchanged and len(counter.texts) == 4
    # Metadata only: still not re-embedded, but filters see the new value.
    await hub.ingest("ops", [doc("guide", "\n\n".join(sections).encode(), tier="b")])
    assert len(counter.texts) == 4
    assert await ids(hub, "ops", "restart workers", matcher=where(tier="b")) == ["guide"]
    assert await ids(hub, "ops", "restart workers", matcher=where(tier="a")) == []
    # One section changes: only that chunk is embedded again.
    sections[2] = "## Part 2\n\nStep 2: drain the broker before the upgrade."
    seen = len(counter.texts)  # the searches above embedded their queries
    out = await hub.ingest("ops", [doc("guide", "\n\n".join(sections).encode(), tier="b")])
    assert not out[0].skipped_unchanged and out[0].chunk_count == 4
    assert counter.texts[seen:] == [sections[2]]
    _, chunks = await hub.document("ops", "guide", True)
    assert [c.ordinal for c in chunks] == [0, 1, 2, 3]
    assert "drain the broker" in chunks[2].text
    hits = await hub.search("ops", Query("worker pool number 2", 10, Mode.LEXICAL))
    assert all("worker pool number 2" not in h.chunk.text for h in hits)
    meta = await hub.store.require("ops")
    assert (meta.document_count, meta.chunk_count) == (1, 4)


async def test_a_bad_document_fails_the_whole_batch_and_writes_nothing(make_hub: MakeHub) -> None:
    hub = await make_hub(max_document_bytes=2048)
    await hub.create_namespace("ops")
    before = await hub.store.redis.keys(hub.store.key("ops", "*"))
    bad_batches = [
        [doc("good", RUNBOOK), doc("pdf", b"%PDF-1.7 garbage", Format.PDF)],
        [doc("good", RUNBOOK), doc("empty", b"  \n ")],
        [doc("good", RUNBOOK), doc("latin1", "caf\xe9".encode("latin-1"))],
        [doc("good", RUNBOOK), doc("big", b"x " * 2000)],
        [doc("good", RUNBOOK), doc("good", RUNBOOK)],
    ]
    for batch in bad_batches:
        with pytest.raises(InvalidArgument) as info:
            await hub.ingest("ops", batch)
        assert info.value.field_violations[0].field.startswith("documents[")
    assert sorted(await hub.store.redis.keys(hub.store.key("ops", "*"))) == sorted(before)
    meta = await hub.store.require("ops")
    assert (meta.document_count, meta.chunk_count, meta.seq) == (0, 0, 0)
    with pytest.raises(NotFound):
        await hub.ingest("nope", [doc("good", RUNBOOK)])


async def test_delete_by_id_and_by_filter(make_hub: MakeHub) -> None:
    hub = await make_hub()
    await hub.create_namespace("ops")
    await hub.ingest(
        "ops",
        [
            doc(
                f"d{i}",
                f"Incident {i}: the payment API returned 502 errors.".encode(),
                env="prod" if i % 2 else "dev",
            )
            for i in range(6)
        ],
    )
    assert len(await ids(hub, "ops", "payment 502")) == 6
    await hub.delete_document("ops", "d0")
    with pytest.raises(NotFound) as info:
        await hub.delete_document("ops", "d0")
    assert info.value.resource_name == "ops/d0"
    prod = where(env="prod")
    assert await hub.delete_documents("ops", [], prod, validate_only=True) == 3
    assert len(await ids(hub, "ops", "payment 502")) == 5
    assert await hub.delete_documents("ops", ["d2"], prod) == 4
    assert await ids(hub, "ops", "payment 502") == ["d4"]
    with pytest.raises(InvalidArgument):
        await hub.delete_documents("ops", [], None)
    meta = await hub.store.require("ops")
    assert (meta.document_count, meta.chunk_count) == (1, 1)


async def test_filters_return_k_matches_however_selective(make_hub: MakeHub) -> None:
    hub = await make_hub()
    await hub.create_namespace("ops")
    docs = [
        doc(
            f"n{i}",
            f"Note {i}: the node ran out of memory and pods were OOMKilled.".encode(),
            region="eu",
        )
        for i in range(30)
    ] + [doc(f"x{i}", f"Lunch menu {i}: soup and bread.".encode(), region="us") for i in range(5)]
    await hub.ingest("ops", docs)
    # The "us" documents are the worst matches for the query; still k of them come back.
    for mode in Mode:
        got = await ids(
            hub, "ops", "pods OOMKilled out of memory", 4, mode=mode, matcher=where(region="us")
        )
        if mode is Mode.LEXICAL:
            assert got == []  # no shared term: BM25 has nothing to rank
        else:
            assert len(got) == 4 and all(g.startswith("x") for g in got)


async def test_restart_loads_the_snapshot(make_hub: MakeHub, tmp_path: Path) -> None:
    hub = await make_hub(tmp_path / "a")
    await hub.create_namespace("ops")
    await hub.ingest("ops", [doc("runbook", RUNBOOK), doc("tls", HTML, Format.HTML)])
    assert await ids(hub, "ops", "disk full node", 1) == ["runbook"]
    await hub.close()
    assert (hub.snapshots / "ops.faiss").is_file()
    again = await make_hub(tmp_path / "a", start=True)
    rep = await again.replica("ops")
    assert rep.loaded_from == "snapshot"
    assert await ids(again, "ops", "disk full node", 1) == ["runbook"]
    assert await ids(again, "ops", "expired certificate", 1) == ["tls"]


async def test_stale_snapshots_are_caught_up_or_rebuilt(make_hub: MakeHub, tmp_path: Path) -> None:
    a = await make_hub(tmp_path / "a")
    await a.create_namespace("ops")
    await a.ingest("ops", [doc("runbook", RUNBOOK), doc("tls", HTML, Format.HTML)])
    await a.replica("ops")
    await a.close()
    # Another replica writes while this one is down.
    other = await make_hub(tmp_path / "b")
    await other.ingest("ops", [doc("etcd", b"Back up etcd nightly with etcdctl snapshot save.")])
    await other.delete_document("ops", "tls")
    # Restart: the snapshot is older than Redis, so the missed changes are replayed.
    b = await make_hub(tmp_path / "a")
    rep = await b.replica("ops")
    assert rep.loaded_from == "snapshot+replay"
    assert await ids(b, "ops", "etcd backup", 1) == ["etcd"]
    assert "tls" not in await ids(b, "ops", "expired TLS certificate")
    await b.close()
    # The change stream lost entries (trimmed): the snapshot cannot be trusted.
    await other.ingest("ops", [doc("dns", b"CoreDNS answers SERVFAIL when upstreams time out.")])
    await other.store.redis.xtrim(other.store.key("ops", "log"), maxlen=0)
    c = await make_hub(tmp_path / "a")
    rep = await c.replica("ops")
    assert rep.loaded_from == "rebuild"
    assert await ids(c, "ops", "SERVFAIL from CoreDNS", 1) == ["dns"]
    await c.close()
    # A damaged snapshot file is rebuilt, not trusted.
    (c.snapshots / "ops.faiss").write_bytes(b"garbage")
    d = await make_hub(tmp_path / "a")
    assert (await d.replica("ops")).loaded_from == "rebuild"
    await d.close()
    # The namespace was deleted and created again: a new incarnation, not the old snapshot.
    await other.delete_namespace("ops", force=True)
    await other.create_namespace("ops")
    await other.ingest("ops", [doc("fresh", b"A brand new namespace about Kafka consumer lag.")])
    e = await make_hub(tmp_path / "a")
    rep = await e.replica("ops")
    assert rep.loaded_from == "rebuild"
    assert await ids(e, "ops", "disk full") == ["fresh"]


async def test_two_replicas_follow_each_others_writes(make_hub: MakeHub, tmp_path: Path) -> None:
    a = await make_hub(tmp_path / "a")
    b = await make_hub(tmp_path / "b")
    await a.create_namespace("ops")
    await a.ingest("ops", [doc("runbook", RUNBOOK)])
    assert await ids(b, "ops", "disk pressure", 1) == ["runbook"]  # b loads
    await b.ingest("ops", [doc("tls", HTML, Format.HTML)])
    assert await ids(a, "ops", "certificate expired", 1) == ["tls"]  # a follows
    await a.ingest("ops", [doc("tls", b"TLS is terminated at the ingress controller.")])
    assert (
        "ingress controller"
        in (await b.search("ops", Query("where is TLS terminated", 1)))[0].chunk.text
    )
    await b.delete_document("ops", "runbook")
    assert "runbook" not in await ids(a, "ops", "disk pressure prune images")
    # Concurrent writers on both replicas: every write lands once, everywhere.
    await asyncio.gather(
        *(a.ingest("ops", [doc(f"a{i}", f"Alpha note {i} about DNS.".encode())]) for i in range(5)),
        *(b.ingest("ops", [doc(f"b{i}", f"Beta note {i} about DNS.".encode())]) for i in range(5)),
        a.ingest("ops", [doc("shared", b"Written by a.")]),
        b.ingest("ops", [doc("shared", b"Written by b.")]),
    )
    stored = set((await a.store.load("ops", with_vectors=False)).chunks)  # type: ignore[union-attr]
    for hub in (a, b):
        await hub.search("ops", Query("DNS", 1))
        rep = await hub.replica("ops")
        assert set(rep.dense.live_items()[0].tolist()) == stored == set(rep.chunks)
        assert len(await ids(hub, "ops", "note about DNS", 20)) >= 10
    meta = await a.store.require("ops")
    assert meta.document_count == 12 and meta.chunk_count == len(stored)


async def test_hnsw_namespaces_tombstone_then_rebuild_in_the_background(make_hub: MakeHub) -> None:
    hub = await make_hub(hnsw_threshold=8, tombstone_ratio=0.25)
    await hub.create_namespace("big")
    await hub.ingest(
        "big",
        [
            doc(f"d{i}", f"Service {i} exposes port {8000 + i} over gRPC.".encode())
            for i in range(12)
        ],
    )
    rep = await hub.replica("big")
    await asyncio.gather(*hub._rebuilds)
    assert rep.dense.kind == HNSW and rep.dense.live == 12
    await hub.delete_documents("big", [f"d{i}" for i in range(4)], None)
    await hub.search("big", Query("service port", 1))
    assert rep.dense.kind == HNSW and len(rep.dense.tombstones) in (0, 4)
    await asyncio.gather(*hub._rebuilds)
    assert not rep.dense.tombstones and rep.dense.live == 8
    got = await ids(hub, "big", "which service exposes port 8010", 20)
    assert "d10" in got[:3] and not {"d0", "d1", "d2", "d3"} & set(got)
    q = (await asyncio.to_thread(hub.embedder("all-MiniLM-L6-v2").encode, ["port"]))[0]
    assert np.isclose(np.linalg.norm(q), 1.0)


async def test_namespace_lifecycle(make_hub: MakeHub) -> None:
    hub = await make_hub()
    await hub.create_namespace("ops", description="runbooks", labels={"team": "sre"})
    await hub.ingest("ops", [doc("runbook", RUNBOOK)])
    await hub.replica("ops")
    with pytest.raises(FailedPrecondition):
        await hub.delete_namespace("ops", force=False)
    with pytest.raises(InvalidArgument):
        await hub.create_namespace("Bad_Name")
    with pytest.raises(InvalidArgument) as info:
        await hub.create_namespace("too-big", max_tokens=300)
    assert info.value.field_violations[0].field == "namespace.chunking.max_tokens"
    await hub.delete_namespace("ops", force=True)
    with pytest.raises(NotFound):
        await hub.search("ops", Query("disk", 1))
    assert await hub.store.redis.keys(hub.store.key("ops", "*")) == []
