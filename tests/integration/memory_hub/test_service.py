"""memory-hub over gRPC in a secure mesh: the RPCs, their bad-input statuses
with details (and nothing half-written), and namespace isolation by RBAC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, from_rpc_error
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import MintToken, StartMesh
from tests.unit.memory_hub.samples import make_pdf

#: Services re-read RBAC bindings at most once a second.
RBAC_REFRESH = 1.1
M = memory_pb2


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, model_path: Any) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_MEMORY_HUB_MAX_DOCUMENT_BYTES", "4096")
    monkeypatch.setenv("AUTOECOOPS_MEMORY_HUB_MAX_K", "50")
    return await start_mesh(["auth-service", "policy-audit", "memory-hub"], secure=True)


def stub(mesh: Mesh) -> memory_pb2_grpc.MemoryServiceStub:
    return memory_pb2_grpc.MemoryServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("memory-hub"))
    )


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def fails(call: Awaitable[Any]) -> AutoEcoOpsError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return from_rpc_error(info.value)


def text_doc(doc_id: str, text: str, **meta: Any) -> memory_pb2.Document:
    d = M.Document(id=doc_id, text=text, content_type=M.CONTENT_TYPE_MARKDOWN)
    d.metadata.update(meta)
    return d


def filt(spec: dict[str, Any]) -> memory_pb2.Filter:
    return json_format.ParseDict(spec, M.Filter())


async def test_namespaces_documents_search_and_context(mesh: Mesh, mint_token: MintToken) -> None:
    mem, admin = stub(mesh), bearer(mint_token("root", ["admin"]))
    created = await mem.CreateNamespace(
        M.CreateNamespaceRequest(namespace=M.Namespace(name="ops", description="runbooks")),
        metadata=admin,
    )
    ns = created.namespace
    assert (ns.embedding_model, ns.embedding_dimensions) == ("all-MiniLM-L6-v2", 384)
    assert (ns.chunking.max_tokens, ns.chunking.overlap_tokens) == (192, 32)
    err = await fails(
        mem.CreateNamespace(
            M.CreateNamespaceRequest(namespace=M.Namespace(name="ops")), metadata=admin
        )
    )
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    reply = await mem.IngestDocuments(
        M.IngestDocumentsRequest(
            namespace="ops",
            documents=[
                text_doc(
                    "disk", "# Disk full\n\nPrune images with crictl rmi --prune.", env="prod"
                ),
                text_doc(
                    "dns", "# DNS\n\nCoreDNS returns SERVFAIL when upstreams time out.", env="dev"
                ),
            ],
        ),
        metadata=admin,
    )
    assert [r.document_id for r in reply.results] == ["disk", "dns"]

    async def batches() -> AsyncIterator[memory_pb2.StreamIngestDocumentsRequest]:
        yield M.StreamIngestDocumentsRequest(
            namespace="ops",
            documents=[text_doc(f"s{i}", f"Stream note {i} on etcd.") for i in range(3)],
        )
        yield M.StreamIngestDocumentsRequest(
            documents=[
                M.Document(
                    id="pdf",
                    content=make_pdf("Etcd quorum needs three members."),
                    content_type=M.CONTENT_TYPE_PDF,
                )
            ]
        )

    streamed = await mem.StreamIngestDocuments(batches(), metadata=admin)
    assert [r.document_id for r in streamed.results] == ["s0", "s1", "s2", "pdf"]
    got = await mem.GetDocument(
        M.GetDocumentRequest(namespace="ops", document_id="disk", include_chunks=True),
        metadata=admin,
    )
    assert got.document.chunk_count == 1 and got.chunks[0].chunk_id == "disk#0"
    assert got.chunks[0].end_offset == len(got.chunks[0].text)
    page = await mem.ListDocuments(
        M.ListDocumentsRequest(namespace="ops", page_size=4), metadata=admin
    )
    rest = await mem.ListDocuments(
        M.ListDocumentsRequest(namespace="ops", page_token=page.next_page_token), metadata=admin
    )
    assert [d.id for d in page.documents] + [d.id for d in rest.documents] == [
        "disk",
        "dns",
        "pdf",
        "s0",
        "s1",
        "s2",
    ]
    assert rest.next_page_token == ""
    found = await mem.Search(
        M.SearchRequest(namespace="ops", query="SERVFAIL from CoreDNS", k=3), metadata=admin
    )
    top = found.results[0]
    assert top.chunk.document_id == "dns" and top.chunk.metadata["env"] == "dev"
    assert 0 < top.score <= 1 and top.dense_score > 0 and top.lexical_score > 0
    only_prod = await mem.Search(
        M.SearchRequest(
            namespace="ops",
            query="SERVFAIL from CoreDNS",
            filter=filt({"field": {"key": "env", "eq": "prod"}}),
        ),
        metadata=admin,
    )
    assert [r.chunk.document_id for r in only_prod.results] == ["disk"]
    ctx = await mem.GetContext(
        M.GetContextRequest(namespace="ops", query="etcd quorum", max_tokens=40), metadata=admin
    )
    assert ctx.context.startswith("[1] ") and 0 < ctx.token_count <= 40
    assert ctx.citations[0].number == 1 and ctx.citations[0].chunk.document_id == "pdf"
    deleted = await mem.DeleteDocuments(
        M.DeleteDocumentsRequest(
            namespace="ops", filter=filt({"field": {"key": "env", "exists": True}})
        ),
        metadata=admin,
    )
    assert deleted.deleted_count == 2
    again = await mem.GetNamespace(M.GetNamespaceRequest(name="ops"), metadata=admin)
    assert again.namespace.document_count == 4
    updated = await mem.UpdateNamespace(
        M.UpdateNamespaceRequest(
            namespace=M.Namespace(name="ops", description="new"),
            update_mask={"paths": ["description"]},
        ),
        metadata=admin,
    )
    assert updated.namespace.description == "new"
    err = await fails(
        mem.UpdateNamespace(
            M.UpdateNamespaceRequest(
                namespace=M.Namespace(name="ops", embedding_model="x"),
                update_mask={"paths": ["embedding_model"]},
            ),
            metadata=admin,
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    err = await fails(mem.DeleteNamespace(M.DeleteNamespaceRequest(name="ops"), metadata=admin))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NAMESPACE_NOT_EMPTY")
    await mem.DeleteNamespace(M.DeleteNamespaceRequest(name="ops", force=True), metadata=admin)
    err = await fails(mem.GetNamespace(M.GetNamespaceRequest(name="ops"), metadata=admin))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_bad_input_gets_details_and_leaves_nothing_behind(
    mesh: Mesh, mint_token: MintToken
) -> None:
    mem, admin = stub(mesh), bearer(mint_token("root", ["admin"]))
    await mem.CreateNamespace(
        M.CreateNamespaceRequest(namespace=M.Namespace(name="ops")), metadata=admin
    )
    good = text_doc("good", "A perfectly fine runbook.")
    cases = [
        (M.Document(id="empty", text="   "), "DOCUMENT_EMPTY", "documents[1].text"),
        (M.Document(id="latin", content=b"caf\xe9 au lait"), "NOT_UTF8", "documents[1].content"),
        (M.Document(id="big", text="x" * 5000), "DOCUMENT_TOO_LARGE", "documents[1].text"),
        (
            M.Document(id="pdf", content=b"%PDF-1.7\nnot really", content_type=M.CONTENT_TYPE_PDF),
            "PDF_UNPARSABLE",
            "documents[1].content",
        ),
        (
            M.Document(id="pdf-text", text="hello", content_type=M.CONTENT_TYPE_PDF),
            "INVALID_DOCUMENTS",
            "documents[1].text",
        ),
    ]
    for bad, reason, field in cases:
        err = await fails(
            mem.IngestDocuments(
                M.IngestDocumentsRequest(namespace="ops", documents=[good, bad]), metadata=admin
            )
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, bad.id
        assert err.reason == reason, bad.id
        assert [v.field for v in err.field_violations] == [field], bad.id
    ns = (await mem.GetNamespace(M.GetNamespaceRequest(name="ops"), metadata=admin)).namespace
    assert (ns.document_count, ns.chunk_count) == (0, 0)
    err = await fails(
        mem.GetDocument(M.GetDocumentRequest(namespace="ops", document_id="good"), metadata=admin)
    )
    assert err.code == grpc.StatusCode.NOT_FOUND and err.resource_name == "ops/good"
    # Unknown namespace: NOT_FOUND naming it.
    err = await fails(
        mem.IngestDocuments(
            M.IngestDocumentsRequest(namespace="nope", documents=[good]), metadata=admin
        )
    )
    assert (err.code, err.reason, err.resource_name) == (
        grpc.StatusCode.NOT_FOUND,
        "NAMESPACE_NOT_FOUND",
        "nope",
    )
    err = await fails(mem.Search(M.SearchRequest(namespace="nope", query="x"), metadata=admin))
    assert err.code == grpc.StatusCode.NOT_FOUND
    # k over the maximum, a malformed filter, a bad weight.
    err = await fails(mem.Search(M.SearchRequest(namespace="ops", query="x", k=51), metadata=admin))
    assert (err.code, err.field_violations[0].field) == (grpc.StatusCode.INVALID_ARGUMENT, "k")
    err = await fails(
        mem.Search(
            M.SearchRequest(
                namespace="ops",
                query="x",
                filter=filt(
                    {"anyOf": {"filters": [{"field": {"key": "a", "range": {"gt": 1, "lt": "b"}}}]}}
                ),
            ),
            metadata=admin,
        )
    )
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_FILTER")
    assert err.field_violations[0].field == "filter.any_of.filters[0].field.range"
    err = await fails(
        mem.Search(
            M.SearchRequest(namespace="ops", query="x", hybrid_weights=M.HybridWeights(dense=-1)),
            metadata=admin,
        )
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    err = await fails(
        mem.Search(M.SearchRequest(namespace="Not A Name", query="x"), metadata=admin)
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    # A stream keeps what it committed and says so.

    async def batches() -> AsyncIterator[memory_pb2.StreamIngestDocumentsRequest]:
        yield M.StreamIngestDocumentsRequest(namespace="ops", documents=[good])
        yield M.StreamIngestDocumentsRequest(documents=[M.Document(id="bad", content=b"\xff")])

    err = await fails(mem.StreamIngestDocuments(batches(), metadata=admin))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.metadata["committed_documents"] == "1"
    ns = (await mem.GetNamespace(M.GetNamespaceRequest(name="ops"), metadata=admin)).namespace
    assert ns.document_count == 1


async def test_callers_see_only_the_namespaces_they_are_bound_to(
    mesh: Mesh, mint_token: MintToken
) -> None:
    mem, admin = stub(mesh), bearer(mint_token("root", ["admin"]))
    auth = auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("auth-service"))
    )
    for name in ("team-a", "team-b"):
        await mem.CreateNamespace(
            M.CreateNamespaceRequest(namespace=M.Namespace(name=name)), metadata=admin
        )
        await mem.IngestDocuments(
            M.IngestDocumentsRequest(
                namespace=name,
                documents=[text_doc("secret", f"The {name} database password rotates monthly.")],
            ),
            metadata=admin,
        )
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(
            role=auth_pb2.Role(
                name="memory-reader", permissions=["memory.namespaces.get", "memory.documents.*"]
            )
        ),
        metadata=admin,
    )
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(
            role=auth_pb2.Role(name="memory-lister", permissions=["memory.namespaces.list"])
        ),
        metadata=admin,
    )
    group = [auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_GROUP, name="team-a")]
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name="a-reads", role="memory-reader", namespace="team-a", subjects=group
            )
        ),
        metadata=admin,
    )
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(name="a-lists", role="memory-lister", subjects=group)
        ),
        metadata=admin,
    )
    await asyncio.sleep(RBAC_REFRESH)
    bob = bearer(mint_token("bob", groups=["team-a"]))
    listed = await mem.ListNamespaces(M.ListNamespacesRequest(), metadata=bob)
    assert [n.name for n in listed.namespaces] == ["team-a"]
    everyone = await mem.ListNamespaces(M.ListNamespacesRequest(page_size=1), metadata=admin)
    assert [n.name for n in everyone.namespaces] == ["team-a"] and everyone.next_page_token
    found = await mem.Search(
        M.SearchRequest(namespace="team-a", query="database password"), metadata=bob
    )
    assert [r.chunk.document_id for r in found.results] == ["secret"]
    for call in (
        mem.Search(M.SearchRequest(namespace="team-b", query="database password"), metadata=bob),
        mem.GetNamespace(M.GetNamespaceRequest(name="team-b"), metadata=bob),
        mem.GetDocument(
            M.GetDocumentRequest(namespace="team-b", document_id="secret"), metadata=bob
        ),
        mem.GetContext(M.GetContextRequest(namespace="team-b", query="password"), metadata=bob),
        mem.IngestDocuments(
            M.IngestDocumentsRequest(namespace="team-b", documents=[text_doc("x", "y")]),
            metadata=bob,
        ),
        # A namespace that does not exist is denied the same way: no probing for names.
        mem.Search(M.SearchRequest(namespace="team-zzz", query="x"), metadata=bob),
    ):
        err = await fails(call)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED

    async def sneaky() -> AsyncIterator[memory_pb2.StreamIngestDocumentsRequest]:
        yield M.StreamIngestDocumentsRequest(namespace="team-b", documents=[text_doc("x", "y")])

    err = await fails(mem.StreamIngestDocuments(sneaky(), metadata=bob))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    # Without the list permission, listing itself is denied.
    carol = bearer(mint_token("carol", groups=["team-c"]))
    err = await fails(mem.ListNamespaces(M.ListNamespacesRequest(), metadata=carol))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    b = (await mem.GetNamespace(M.GetNamespaceRequest(name="team-b"), metadata=admin)).namespace
    assert b.document_count == 1
