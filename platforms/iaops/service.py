"""Platform-02 IAOps's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.iaops.v1 import iaops_pb2, iaops_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime


class IaOpsServicer(iaops_pb2_grpc.IaOpsServiceServicer):
    """Serves autoecoops.iaops.v1.IaOpsService."""

    PENDING = "IaC validation, GitOps deployment and supply-chain checks are not built yet"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-02 IAOps's servicers to ``server``."""
    iaops_pb2_grpc.add_IaOpsServiceServicer_to_server(IaOpsServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [iaops_pb2.DESCRIPTOR.services_by_name["IaOpsService"].full_name]
