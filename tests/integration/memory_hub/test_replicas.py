"""Two memory-hub servers (two replicas, each with its own faiss index) on one Redis
and key prefix: what is ingested through one is searchable through the other, and
what is deleted through one is gone from the other (polled, with a generous bound)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest

from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2 as M
from tests.conftest import MintToken, StartMesh, free_port
from tests.integration.memory_hub.test_service import bearer, stub, text_doc

BOUND = 30.0


async def poll(mesh: Mesh, md: Any, query: str, doc_id: str, present: bool) -> None:
    """Search ``mesh``'s memory-hub until ``doc_id`` is (or is no longer) among the hits."""
    end = time.monotonic() + BOUND
    while True:
        found = await stub(mesh).Search(
            M.SearchRequest(namespace="ops", query=query, k=5), metadata=md
        )
        ids = [r.chunk.document_id for r in found.results]
        if (doc_id in ids) == present:
            return
        assert time.monotonic() < end, f"{doc_id} {'never appeared' if present else 'stayed'}"
        await asyncio.sleep(0.05)


async def test_a_document_ingested_through_one_replica_is_searchable_through_another(
    start_mesh: StartMesh, mint_token: MintToken, monkeypatch: pytest.MonkeyPatch, model_path: Any
) -> None:
    a = await start_mesh(["auth-service", "policy-audit", "memory-hub"], secure=True)
    ports = {**a.config.ports, "memory-hub": free_port()}
    # Its own data directory too (replicas never share snapshot files), so its
    # service identity comes from client credentials, as from a Secret in a pod.
    b_dir = a.config.data_dir / "replica-b"
    b_dir.mkdir()
    creds = json.loads((a.config.data_dir / "auth" / "mesh-client.json").read_text())
    monkeypatch.setenv("AUTOECOOPS_SERVICE_CLIENT_ID", creds["client_id"])
    monkeypatch.setenv("AUTOECOOPS_SERVICE_CLIENT_SECRET", creds["client_secret"])
    b = await start_mesh(
        ["memory-hub"],
        config=dataclasses.replace(a.config, ports=ports, data_dir=b_dir),
        secure=True,
    )
    md = bearer(mint_token("root", ["admin"]))
    await stub(a).CreateNamespace(
        M.CreateNamespaceRequest(namespace=M.Namespace(name="ops")), metadata=md
    )
    await stub(a).IngestDocuments(
        M.IngestDocumentsRequest(
            namespace="ops",
            documents=[text_doc("disk", "# Disk full\n\nPrune images with crictl rmi --prune.")],
        ),
        metadata=md,
    )
    await poll(b, md, "prune container images on a full disk", "disk", True)
    # B has the namespace loaded now; a later write through A reaches it too.
    await stub(a).IngestDocuments(
        M.IngestDocumentsRequest(
            namespace="ops",
            documents=[text_doc("dns", "# DNS\n\nCoreDNS returns SERVFAIL when upstreams fail.")],
        ),
        metadata=md,
    )
    await poll(b, md, "SERVFAIL from CoreDNS", "dns", True)
    # And the other way round, then deletes both ways.
    await stub(b).IngestDocuments(
        M.IngestDocumentsRequest(
            namespace="ops",
            documents=[text_doc("tls", "# TLS\n\ncert-manager renews certificates early.")],
        ),
        metadata=md,
    )
    await poll(a, md, "certificate renewal by cert-manager", "tls", True)
    await stub(a).DeleteDocument(
        M.DeleteDocumentRequest(namespace="ops", document_id="dns"), metadata=md
    )
    await poll(b, md, "SERVFAIL from CoreDNS", "dns", False)
    await stub(b).DeleteDocument(
        M.DeleteDocumentRequest(namespace="ops", document_id="disk"), metadata=md
    )
    await poll(a, md, "prune container images on a full disk", "disk", False)
    for mesh in (a, b):
        got = await stub(mesh).GetNamespace(M.GetNamespaceRequest(name="ops"), metadata=md)
        assert got.namespace.document_count == 1
