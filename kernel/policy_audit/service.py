"""policy-audit's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Serves autoecoops.policy.v1.PolicyService."""

    PENDING = "Rego evaluation and policy bundles land with the policy-audit issue"


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Serves autoecoops.audit.v1.AuditService."""

    PENDING = (
        "the tamper-evident audit trail and compliance reports land with the policy-audit issue"
    )


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add policy-audit's servicers to ``server``."""
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(), server)  # type: ignore[abstract]  # pending RPCs answer UNIMPLEMENTED
    return [
        policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    ]
