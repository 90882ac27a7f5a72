"""auth-service's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Serves autoecoops.auth.v1.AuthService."""

    PENDING = (
        "token issuance, JWT verification, federation and RBAC land with the auth-service issue"
    )


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add auth-service's servicers to ``server``."""
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name]
