"""memory-hub's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2, timestamp

from autoecoops.kernel.mesh import paging
from autoecoops.kernel.mesh.audit import outbox_for
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    ConfigError,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
)
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc

try:
    from autoecoops.kernel.memory_hub import search as srch
    from autoecoops.kernel.memory_hub.filters import compile_filter
    from autoecoops.kernel.memory_hub.hub import DocumentInput, MemoryHub, check_namespace_name
    from autoecoops.kernel.memory_hub.parsing import Format
    from autoecoops.kernel.memory_hub.replica import snapshot_dir
    from autoecoops.kernel.memory_hub.settings import MemoryHubSettings
    from autoecoops.kernel.memory_hub.store import (
        ChunkRecord,
        DocRecord,
        MemoryStore,
        NamespaceRecord,
    )
except ImportError as err:  # pragma: no cover - depends on the install
    _MISSING: ImportError | None = err
else:
    _MISSING = None

DEFAULT_PAGE, MAX_PAGE = 50, 1000
#: Namespaces examined per round trip while filtering a page by visibility.
SCAN = 200


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def namespace_pb(rec: NamespaceRecord) -> memory_pb2.Namespace:
    """A stored namespace as its proto."""
    return memory_pb2.Namespace(
        name=rec.name,
        description=rec.description,
        labels=rec.labels,
        embedding_model=rec.model,
        embedding_dimensions=rec.dimensions,
        chunking=memory_pb2.ChunkingConfig(
            max_tokens=rec.max_tokens, overlap_tokens=rec.overlap_tokens
        ),
        document_count=rec.document_count,
        chunk_count=rec.chunk_count,
        create_time=timestamp.from_nanoseconds(int(rec.create_time * 1e9)),
        update_time=timestamp.from_nanoseconds(int(rec.update_time * 1e9)),
    )


def document_pb(doc: DocRecord) -> memory_pb2.Document:
    """A stored document as its proto (without content)."""
    return memory_pb2.Document(
        id=doc.id,
        content_type=doc.content_type,  # type: ignore[arg-type]
        title=doc.title,
        source_uri=doc.source_uri,
        metadata=_struct(doc.metadata),
        content_hash=doc.content_hash,
        chunk_count=len(doc.labels),
        create_time=timestamp.from_nanoseconds(int(doc.create_time * 1e9)),
        update_time=timestamp.from_nanoseconds(int(doc.update_time * 1e9)),
    )


def chunk_pb(chunk: ChunkRecord, doc: DocRecord) -> memory_pb2.Chunk:
    """A chunk as its proto, with its document's attributes for citation."""
    return memory_pb2.Chunk(
        chunk_id=f"{chunk.doc_id}#{chunk.ordinal}",
        document_id=chunk.doc_id,
        ordinal=chunk.ordinal,
        text=chunk.text,
        start_offset=chunk.start,
        end_offset=chunk.end,
        metadata=_struct(doc.metadata),
        title=doc.title,
        source_uri=doc.source_uri,
    )


def document_input(d: memory_pb2.Document, path: str) -> DocumentInput:
    """One proto document as the hub's input."""
    fmt = d.content_type or memory_pb2.CONTENT_TYPE_TEXT
    if fmt not in {f.value for f in Format}:
        raise InvalidArgument(
            f"{path}.content_type: unknown content type {fmt}",
            reason="INVALID_DOCUMENTS",
            field_violations=[FieldViolation(f"{path}.content_type", "unknown content type")],
        )
    body = d.WhichOneof("body")
    raw = d.text.encode() if body == "text" else d.content
    return DocumentInput(
        id=d.id,
        raw=raw,
        format=Format(fmt),
        title=d.title,
        source_uri=d.source_uri,
        metadata=json_format.MessageToDict(d.metadata) if d.HasField("metadata") else {},
        as_text=body == "text",
        path=path,
    )


def _mode(mode: int) -> srch.Mode:
    if mode == memory_pb2.SEARCH_MODE_UNSPECIFIED:
        return srch.Mode.HYBRID
    if mode not in {m.value for m in srch.Mode}:
        raise InvalidArgument(
            f"mode: unknown search mode {mode}",
            field_violations=[FieldViolation("mode", "unknown search mode")],
        )
    return srch.Mode(mode)


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Serves autoecoops.memory.v1.MemoryService."""

    def __init__(self, hub: MemoryHub, runtime: Runtime) -> None:
        self.hub = hub
        self.runtime = runtime

    # -- visibility --------------------------------------------------------------

    async def _can(self, permission: str, namespace: str) -> bool:
        principal = current_principal.get()
        authorizer = self.runtime.authorizer
        if principal is None or authorizer is None:
            return False
        try:
            await authorizer.check(principal, permission, namespace)
        except PermissionDenied:
            return False
        return True

    # -- namespaces --------------------------------------------------------------

    async def CreateNamespace(
        self, request: memory_pb2.CreateNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.CreateNamespaceResponse:
        """Create a namespace."""
        n = request.namespace
        chunking = n.chunking if n.HasField("chunking") else None
        rec = await self.hub.create_namespace(
            n.name,
            n.description,
            dict(n.labels),
            n.embedding_model,
            chunking.max_tokens if chunking else 0,
            chunking.overlap_tokens if chunking else None,
        )
        return memory_pb2.CreateNamespaceResponse(namespace=namespace_pb(rec))

    async def GetNamespace(
        self, request: memory_pb2.GetNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.GetNamespaceResponse:
        """Get a namespace."""
        check_namespace_name(request.name)
        rec = await self.hub.store.require(request.name)
        return memory_pb2.GetNamespaceResponse(namespace=namespace_pb(rec))

    async def ListNamespaces(
        self, request: memory_pb2.ListNamespacesRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.ListNamespacesResponse:
        """The namespaces the caller may get, one page at a time: the others are
        not merely hidden but never named."""
        size = paging.page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
        after = paging.decode_cursor(request.page_token)
        page: list[str] = []
        more = False
        while not more:
            names = await self.hub.store.namespace_names(after, SCAN)
            for name in names:
                if await self._can("memory.namespaces.get", name):
                    if len(page) == size:
                        more = True
                        break
                    page.append(name)
            if len(names) < SCAN:
                break
            after = names[-1]
        recs = await self.hub.store.namespaces(page)
        return memory_pb2.ListNamespacesResponse(
            namespaces=[namespace_pb(r) for r in recs],
            next_page_token=paging.encode_cursor(page[-1]) if more and page else "",
        )

    async def UpdateNamespace(
        self, request: memory_pb2.UpdateNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.UpdateNamespaceResponse:
        """Change a namespace's description or labels."""
        n = request.namespace
        check_namespace_name(n.name, "namespace.name")
        paths = list(request.update_mask.paths) or ["description", "labels"]
        bad = [
            FieldViolation(f"update_mask.paths[{i}]", f"{p!r} cannot be updated")
            for i, p in enumerate(paths)
            if p not in ("description", "labels")
        ]
        if bad:
            raise InvalidArgument(
                "only description and labels can be updated; the model and chunking are fixed",
                reason="FIELD_NOT_UPDATABLE",
                field_violations=bad,
            )
        rec = await self.hub.store.update_namespace(
            n.name,
            n.description if "description" in paths else None,
            dict(n.labels) if "labels" in paths else None,
        )
        return memory_pb2.UpdateNamespaceResponse(namespace=namespace_pb(rec))

    async def DeleteNamespace(
        self, request: memory_pb2.DeleteNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.DeleteNamespaceResponse:
        """Delete a namespace."""
        check_namespace_name(request.name)
        await self.hub.delete_namespace(request.name, request.force)
        return memory_pb2.DeleteNamespaceResponse()

    # -- documents ---------------------------------------------------------------

    async def IngestDocuments(
        self, request: memory_pb2.IngestDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.IngestDocumentsResponse:
        """Ingest a batch, all or nothing."""
        check_namespace_name(request.namespace, "namespace")
        docs = [document_input(d, f"documents[{i}]") for i, d in enumerate(request.documents)]
        results = await self.hub.ingest(request.namespace, docs)
        return memory_pb2.IngestDocumentsResponse(results=[_result(r) for r in results])

    async def StreamIngestDocuments(
        self,
        request_iterator: AsyncIterator[memory_pb2.StreamIngestDocumentsRequest],
        context: grpc.aio.ServicerContext,
    ) -> memory_pb2.StreamIngestDocumentsResponse:
        """Ingest a stream: each message is one atomic batch, committed as it
        arrives, so a failure keeps the batches before it (the error says how
        many documents were committed) and a retry skips them as unchanged."""
        namespace = ""
        results: list[memory_pb2.DocumentIngestResult] = []
        index = 0
        async for message in request_iterator:
            try:
                if not namespace:
                    namespace = message.namespace
                    check_namespace_name(namespace, "namespace")
                    # The interceptor cannot read a namespace from a stream
                    # before it opens; check the caller's binding here.
                    if not await self._can("memory.documents.ingest", namespace):
                        raise PermissionDenied(
                            f"lacks permission memory.documents.ingest in namespace {namespace!r}",
                            reason="PERMISSION_MISSING",
                            metadata={
                                "permission": "memory.documents.ingest",
                                "namespace": namespace,
                            },
                        )
                elif message.namespace and message.namespace != namespace:
                    raise InvalidArgument(
                        f"every message must name namespace {namespace!r} or none",
                        reason="NAMESPACE_CHANGED",
                        field_violations=[
                            FieldViolation("namespace", "differs from the first message")
                        ],
                    )
                docs = [
                    document_input(d, f"documents[{index + i}]")
                    for i, d in enumerate(message.documents)
                ]
                if docs:
                    results += [_result(r) for r in await self.hub.ingest(namespace, docs)]
                index += len(docs)
            except AutoEcoOpsError as err:
                err.metadata["committed_documents"] = str(len(results))
                raise
        if not namespace:
            raise InvalidArgument(
                "the stream named no namespace",
                reason="NAMESPACE_MISSING",
                field_violations=[FieldViolation("namespace", "required on the first message")],
            )
        return memory_pb2.StreamIngestDocumentsResponse(results=results)

    async def GetDocument(
        self, request: memory_pb2.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.GetDocumentResponse:
        """A document, with its chunks on request."""
        check_namespace_name(request.namespace, "namespace")
        doc, chunks = await self.hub.document(
            request.namespace, request.document_id, request.include_chunks
        )
        return memory_pb2.GetDocumentResponse(
            document=document_pb(doc), chunks=[chunk_pb(c, doc) for c in chunks]
        )

    async def ListDocuments(
        self, request: memory_pb2.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.ListDocumentsResponse:
        """A page of documents in id order."""
        check_namespace_name(request.namespace, "namespace")
        size = paging.page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
        after = paging.decode_cursor(request.page_token)
        await self.hub.store.require(request.namespace)
        ids = await self.hub.store.document_ids(request.namespace, after, size + 1)
        found = await self.hub.store.documents(request.namespace, ids[:size])
        page = [found[i][0] for i in ids[:size] if i in found]
        return memory_pb2.ListDocumentsResponse(
            documents=[document_pb(d) for d in page],
            next_page_token=paging.encode_cursor(ids[size - 1]) if len(ids) > size else "",
        )

    async def DeleteDocument(
        self, request: memory_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.DeleteDocumentResponse:
        """Delete one document."""
        check_namespace_name(request.namespace, "namespace")
        await self.hub.delete_document(request.namespace, request.document_id)
        return memory_pb2.DeleteDocumentResponse()

    async def DeleteDocuments(
        self, request: memory_pb2.DeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.DeleteDocumentsResponse:
        """Delete by ids and/or filter, atomically."""
        check_namespace_name(request.namespace, "namespace")
        matcher = compile_filter(request.filter if request.HasField("filter") else None)
        n = await self.hub.delete_documents(
            request.namespace, list(request.document_ids), matcher, request.validate_only
        )
        return memory_pb2.DeleteDocumentsResponse(deleted_count=n)

    # -- search --------------------------------------------------------------------

    def _query(
        self,
        text: str,
        k: int,
        mode: int,
        f: memory_pb2.Filter | None,
        weights: memory_pb2.HybridWeights | None = None,
        min_score: float = 0.0,
    ) -> srch.Query:
        settings = self.hub.settings
        dense, lexical = settings.dense_weight, settings.lexical_weight
        if weights is not None and (weights.dense or weights.lexical):
            if weights.dense < 0 or weights.lexical < 0:
                raise InvalidArgument(
                    "hybrid_weights must not be negative",
                    field_violations=[FieldViolation("hybrid_weights", "must be 0 or more")],
                )
            dense, lexical = weights.dense, weights.lexical
        if not 0 <= min_score <= 1:
            raise InvalidArgument(
                "min_score must be in [0, 1]",
                field_violations=[FieldViolation("min_score", "must be in [0, 1]")],
            )
        return srch.Query(
            text=text,
            k=k,
            mode=_mode(mode),
            matcher=compile_filter(f),
            dense_weight=dense,
            lexical_weight=lexical,
            min_score=min_score,
        )

    async def Search(
        self, request: memory_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.SearchResponse:
        """The chunks most relevant to a query."""
        check_namespace_name(request.namespace, "namespace")
        q = self._query(
            request.query,
            self.hub.check_k(request.k),
            request.mode,
            request.filter if request.HasField("filter") else None,
            request.hybrid_weights if request.HasField("hybrid_weights") else None,
            request.min_score,
        )
        hits = await self.hub.search(request.namespace, q)
        return memory_pb2.SearchResponse(
            results=[
                memory_pb2.SearchResult(
                    chunk=chunk_pb(h.chunk, h.doc),
                    score=h.score,
                    dense_score=h.dense,
                    lexical_score=h.lexical,
                )
                for h in hits
            ]
        )

    async def GetContext(
        self, request: memory_pb2.GetContextRequest, context: grpc.aio.ServicerContext
    ) -> memory_pb2.GetContextResponse:
        """The best chunks assembled into one text within a token budget."""
        check_namespace_name(request.namespace, "namespace")
        q = self._query(
            request.query,
            self.hub.settings.max_k,
            request.mode,
            request.filter if request.HasField("filter") else None,
        )
        out = await self.hub.context(request.namespace, q, request.max_tokens)
        return memory_pb2.GetContextResponse(
            context=out.text,
            citations=[
                memory_pb2.Citation(
                    number=c.number, chunk=chunk_pb(c.hit.chunk, c.hit.doc), score=c.hit.score
                )
                for c in out.citations
            ],
            token_count=out.tokens,
        )


def _result(r: Any) -> memory_pb2.DocumentIngestResult:
    return memory_pb2.DocumentIngestResult(
        document_id=r.document_id,
        chunk_count=r.chunk_count,
        skipped_unchanged=r.skipped_unchanged,
        content_hash=r.content_hash,
    )


def build_hub(runtime: Runtime) -> MemoryHub:
    """The hub over the runtime's Redis, with snapshots under the data directory."""
    if _MISSING is not None:
        raise ConfigError(
            f"memory-hub needs the [memory] extra ({_MISSING.name} is missing): "
            "pip install -e '.[server,memory]'"
        )
    settings = MemoryHubSettings.from_env()
    store = MemoryStore(
        runtime.redis,
        runtime.key("memory-hub"),
        settings.change_log_len,
        outbox_for(runtime, "memory-hub"),
    )
    snapshots = snapshot_dir(runtime.config.data_dir, runtime.config.key_prefix)
    return MemoryHub(store, settings, snapshots)


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add memory-hub's servicers to ``server``; alone in its process, it loads its model once it serves."""
    hub = build_hub(runtime)
    runtime.starters.append(hub.start)

    def preload() -> None:
        # Where memory-hub has the process to itself (a replica, a pod). In an
        # all-in-one process (`autoecoops up`) torch's import would hold the GIL
        # from every other service for seconds; there the first search loads it.
        if runtime.services == ["memory-hub"]:
            hub.load_default_model()

    runtime.started.append(preload)
    runtime.closers.append(hub.close)
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(hub, runtime), server)
    return [memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name]
