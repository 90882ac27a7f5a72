"""Platform-03 MachineNativeOps's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.kernel.mesh.server import Runtime
from autoecoops.machineops.v1 import machineops_pb2, machineops_pb2_grpc


class MachineOpsServicer(machineops_pb2_grpc.MachineOpsServiceServicer):
    """Serves autoecoops.machineops.v1.MachineOpsService."""

    PENDING = "node baselines, hardware inventory and edge agents are not built yet"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-03 MachineNativeOps's servicers to ``server``."""
    machineops_pb2_grpc.add_MachineOpsServiceServicer_to_server(MachineOpsServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [machineops_pb2.DESCRIPTOR.services_by_name["MachineOpsService"].full_name]
