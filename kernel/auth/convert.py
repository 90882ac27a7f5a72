"""proto <-> domain for the RBAC objects, shared by auth-service's edge and the
mesh's authorizer, which receives them over WatchAuthorization."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from autoecoops.auth.v1 import auth_pb2
from autoecoops.kernel.auth.rbac import Binding, Role, Subject
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

_KINDS = {
    auth_pb2.SUBJECT_KIND_USER: "user",
    auth_pb2.SUBJECT_KIND_GROUP: "group",
    auth_pb2.SUBJECT_KIND_SERVICE_ACCOUNT: "serviceaccount",
}
_KIND_VALUES = {v: k for k, v in _KINDS.items()}


def ts(epoch: float) -> timestamp_pb2.Timestamp:
    """Epoch seconds -> Timestamp (unset for 0)."""
    out = timestamp_pb2.Timestamp()
    if epoch:
        out.FromNanoseconds(int(epoch * 1e9))
    return out


def role_to_pb(role: Role) -> auth_pb2.Role:
    """Domain role -> proto."""
    return auth_pb2.Role(
        name=role.name,
        permissions=list(role.permissions),
        description=role.description,
        create_time=ts(role.create_time),
        update_time=ts(role.update_time),
    )


def role_from_pb(pb: auth_pb2.Role) -> Role:
    """Proto role -> domain."""
    return Role(pb.name, tuple(pb.permissions), pb.description)


def binding_to_pb(b: Binding) -> auth_pb2.RoleBinding:
    """Domain binding -> proto."""
    return auth_pb2.RoleBinding(
        name=b.name,
        role=b.role,
        subjects=[auth_pb2.Subject(kind=_KIND_VALUES[s.kind], name=s.name) for s in b.subjects],  # type: ignore[misc]
        namespace=b.namespace,
        create_time=ts(b.create_time),
    )


def binding_from_pb(pb: auth_pb2.RoleBinding) -> Binding:
    """Proto binding -> domain; an unspecified subject kind is a field violation."""
    subjects = []
    for i, s in enumerate(pb.subjects):
        if s.kind not in _KINDS:
            raise InvalidArgument(
                "subject kind is required",
                field_violations=[
                    FieldViolation(
                        f"role_binding.subjects[{i}].kind", "must be USER, GROUP or SERVICE_ACCOUNT"
                    )
                ],
            )
        subjects.append(Subject(_KINDS[s.kind], s.name))
    return Binding(pb.name, pb.role, tuple(subjects), pb.namespace)
