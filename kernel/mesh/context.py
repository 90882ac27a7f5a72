"""Context from memory-hub, the one way a platform looks it up.

The seed's synchronous flow has a step "memory-hub search for context": a
platform asks memory-hub's Search for the documents about what it is
handling (an alert, a remediation, a failed control) and cites them. It
never re-implements the search. Context is an aid, not a precondition: when
memory-hub is down, the namespace is missing or the caller may not search,
the answer is no citations (logged and counted), never a failed request.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from prometheus_client import Counter

from autoecoops.common.v1 import types_pb2
from autoecoops.kernel.mesh.backoff import Backoff
from autoecoops.kernel.mesh.clients import ClientFactory, remaining_timeout
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, from_rpc_error
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger("autoecoops.context")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: Lookups by outcome: found (citations returned), empty (none matched),
#: failed (memory-hub unreachable, namespace missing, not allowed), cached.
LOOKUPS = Counter(
    "autoecoops_context_lookups_total",
    "memory-hub context lookups made by platforms, by caller and outcome.",
    ["caller", "outcome"],
)
#: A namespace value that turns the lookup off.
OFF = "off"


class MemoryContext:
    """Searches memory-hub for context and returns citations, best first.

    ``cache_ttl`` keeps an answer (empty and failed ones too) for that many
    seconds, so a fleet reporting the same failure asks memory-hub once, and
    a memory-hub outage costs one timeout per query per TTL, not one per
    request. 0 asks every time.
    """

    def __init__(
        self,
        clients: ClientFactory,
        caller: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        cache_ttl: float = 0.0,
        cache_size: int = 4096,
    ) -> None:
        self._clients = clients
        self._caller = caller
        self._timeout = timeout
        self._attempts = attempts
        self._ttl = cache_ttl
        self._size = cache_size
        self._cache: dict[tuple[str, str, int], tuple[float, list[types_pb2.ContextCitation]]] = {}

    async def search(
        self, namespace: str, query: str, k: int = 3
    ) -> list[types_pb2.ContextCitation]:
        """The ``k`` most relevant documents of ``namespace`` for ``query`` (one citation
        per document, its best chunk); [] when off, empty or unavailable."""
        if not namespace or namespace == OFF or not query.strip():
            return []
        key = (namespace, query, k)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            LOOKUPS.labels(self._caller, "cached").inc()
            return [_copy(c) for c in hit[1]]
        try:
            reply = await self._call(
                memory_pb2.SearchRequest(namespace=namespace, query=query, k=k)
            )
        except AutoEcoOpsError as err:
            LOOKUPS.labels(self._caller, "failed").inc()
            log.info("no memory-hub context from %s: %s", namespace, err.message)
            self._remember(key, [])
            return []
        citations: list[types_pb2.ContextCitation] = []
        seen: set[str] = set()
        for r in reply.results:
            # Several chunks of one document answer alike; cite the document once.
            if r.chunk.document_id in seen:
                continue
            seen.add(r.chunk.document_id)
            citations.append(
                types_pb2.ContextCitation(
                    document_id=r.chunk.document_id,
                    title=r.chunk.title,
                    source=r.chunk.source_uri,
                    snippet=r.chunk.text[:500],
                    score=float(r.score),
                    namespace=namespace,
                )
            )
        LOOKUPS.labels(self._caller, "found" if citations else "empty").inc()
        self._remember(key, citations)
        return [_copy(c) for c in citations]

    async def _call(self, request: memory_pb2.SearchRequest) -> memory_pb2.SearchResponse:
        stub = self._clients.stub(memory_pb2_grpc.MemoryServiceStub, "memory-hub")
        backoff = Backoff(0.1, 1.0, multiplier=4.0)
        for attempt in range(1, self._attempts + 1):
            try:
                reply: memory_pb2.SearchResponse = await stub.Search(
                    request, timeout=remaining_timeout(self._timeout)
                )
                return reply
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE or attempt == self._attempts:
                    raise from_rpc_error(err) from None
            await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")

    def _remember(self, key: tuple[str, str, int], value: list[types_pb2.ContextCitation]) -> None:
        if self._ttl <= 0:
            return
        if len(self._cache) >= self._size:
            now = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._size:
                self._cache.clear()
        self._cache[key] = (time.monotonic() + self._ttl, value)


def _copy(c: types_pb2.ContextCitation) -> types_pb2.ContextCitation:
    # Callers extend their messages with these; a copy keeps the cache's own.
    out = types_pb2.ContextCitation()
    out.CopyFrom(c)
    return out
