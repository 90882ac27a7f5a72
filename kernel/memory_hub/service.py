"""memory-hub's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.kernel.mesh.server import Runtime
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Serves autoecoops.memory.v1.MemoryService."""

    PENDING = "document ingestion, embeddings and RAG search land with the memory-hub issue"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add memory-hub's servicers to ``server``."""
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name]
