"""infra-manager's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime


class InfraServicer(infra_pb2_grpc.InfraServiceServicer):
    """Serves autoecoops.infra.v1.InfraService."""

    PENDING = (
        "GitOps reconciliation, drift detection and rollback land with the infra-manager issue"
    )


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add infra-manager's servicers to ``server``."""
    infra_pb2_grpc.add_InfraServiceServicer_to_server(InfraServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [infra_pb2.DESCRIPTOR.services_by_name["InfraService"].full_name]
