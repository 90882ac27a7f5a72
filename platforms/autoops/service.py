"""Platform-01 IndestructibleAutoOps's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.autoops.v1 import autoops_pb2, autoops_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime


class AutoOpsServicer(autoops_pb2_grpc.AutoOpsServiceServicer):
    """Serves autoecoops.autoops.v1.AutoOpsService."""

    PENDING = "SLOs, error budgets and self-healing runbooks are not built yet"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-01 IndestructibleAutoOps's servicers to ``server``."""
    autoops_pb2_grpc.add_AutoOpsServiceServicer_to_server(AutoOpsServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [autoops_pb2.DESCRIPTOR.services_by_name["AutoOpsService"].full_name]
