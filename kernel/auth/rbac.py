"""RBAC: roles are permission sets, bindings grant roles to subjects.

Permissions are dotted (``memory.documents.search``). A ``*`` segment matches
one segment; a trailing ``*`` matches the rest (``memory.*``, ``*``).
Bindings are cluster-wide or scoped to one namespace (tenant). Deny is the
default. Escalation is prevented the Kubernetes way: you may only create a
role, or bind one, whose permissions you already hold where it applies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
)

_SEGMENT = re.compile(r"^(\*|[a-z][a-z0-9_-]*)$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
SUBJECT_KINDS = ("user", "group", "serviceaccount")


def check_permission_syntax(permission: str, field_name: str = "permission") -> None:
    """Reject a malformed permission pattern with a field violation."""
    parts = permission.split(".")
    if not permission or len(parts) > 8 or not all(_SEGMENT.match(p) for p in parts):
        raise InvalidArgument(
            f"{permission!r} is not a permission (dotted lowercase segments, '*' wildcards)",
            field_violations=[FieldViolation(field_name, "malformed permission")],
        )


def check_name(name: str, field_name: str = "name") -> None:
    """Resource names are DNS-label-like, so they are safe in keys and URLs."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{name!r} is not a valid name (lowercase letters, digits, '.', '_' and '-', at most 63)",
            field_violations=[FieldViolation(field_name, "invalid name")],
        )


def matches(granted: str, wanted: str) -> bool:
    """Whether the pattern ``granted`` covers the permission or pattern ``wanted``."""
    g, w = granted.split("."), wanted.split(".")
    for i, seg in enumerate(g):
        if seg == "*" and i == len(g) - 1:
            return True  # a trailing wildcard covers the rest, however deep
        if i >= len(w):
            return False
        if seg != "*" and seg != w[i]:
            return False
        if seg != "*" and w[i] == "*":
            return False  # a concrete segment never covers a wildcard
    return len(g) == len(w)


@dataclass(frozen=True, slots=True)
class Role:
    """A named set of permission patterns."""

    name: str
    permissions: tuple[str, ...]
    description: str = ""
    create_time: float = 0.0
    update_time: float = 0.0


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a binding names: kind is user, group or serviceaccount."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class Binding:
    """Grants ``role`` to ``subjects``, cluster-wide when ``namespace`` is empty."""

    name: str
    role: str
    subjects: tuple[Subject, ...]
    namespace: str = ""
    create_time: float = 0.0


@dataclass(frozen=True)
class Policy:
    """A snapshot of all roles and bindings, answering permission questions."""

    roles: Mapping[str, Role] = field(default_factory=dict)
    bindings: Sequence[Binding] = ()

    def _subject_matches(self, subject: Subject, principal: Principal) -> bool:
        if subject.kind == "group":
            return subject.name in principal.groups
        return subject.name == principal.subject

    def grants(self, principal: Principal, namespace: str = "") -> list[tuple[str, str]]:
        """(permission pattern, granted by) pairs the principal holds in ``namespace``."""
        out: list[tuple[str, str]] = []
        for role_name in principal.roles:
            role = self.roles.get(role_name)
            if role is not None:
                out += [(p, f"token role {role_name}") for p in role.permissions]
        for b in self.bindings:
            if b.namespace and b.namespace != namespace:
                continue
            if any(self._subject_matches(s, principal) for s in b.subjects):
                role = self.roles.get(b.role)
                if role is not None:
                    out += [(p, f"binding {b.name}") for p in role.permissions]
        return out

    def holds_anywhere(self, principal: Principal, permission: str) -> bool:
        """Whether any role of the principal, in any namespace, covers ``permission``.

        This is what a token may be scoped to: a scope asks for a subset of
        what the subject holds somewhere (the namespace is checked per call).
        """
        patterns = [
            p for r in principal.roles if (role := self.roles.get(r)) for p in role.permissions
        ]
        for b in self.bindings:
            if any(self._subject_matches(s, principal) for s in b.subjects):
                role = self.roles.get(b.role)
                if role is not None:
                    patterns += role.permissions
        return any(matches(p, permission) for p in patterns)

    def allowed(self, principal: Principal, permission: str, namespace: str = "") -> str | None:
        """What grants ``permission`` (a description), or None when denied.

        A token with a ``scope`` claim is down-scoped: the permission must
        also fall within one of its scopes.
        """
        scope = principal.claims.get("scope")
        if (
            isinstance(scope, str)
            and scope
            and not any(matches(s, permission) for s in scope.split())
        ):
            return None
        for pattern, by in self.grants(principal, namespace):
            if matches(pattern, permission):
                return by
        return None

    def check(self, principal: Principal, permission: str, namespace: str = "") -> str:
        """Like ``allowed`` but raises PERMISSION_DENIED naming the permission."""
        by = self.allowed(principal, permission, namespace)
        if by is None:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise PermissionDenied(
                f"{principal.subject} lacks permission {permission}{where}",
                reason="PERMISSION_MISSING",
                metadata={
                    "permission": permission,
                    **({"namespace": namespace} if namespace else {}),
                },
            )
        return by

    def namespaces_with(
        self, principal: Principal, permission: str, candidates: Iterable[str]
    ) -> list[str]:
        """The namespaces among ``candidates`` where ``permission`` is held."""
        return [ns for ns in candidates if self.allowed(principal, permission, ns) is not None]

    def check_no_escalation(
        self, principal: Principal, permissions: Iterable[str], namespace: str = ""
    ) -> None:
        """Raise unless the caller holds every one of ``permissions`` where they apply."""
        for wanted in permissions:
            if self.allowed(principal, wanted, namespace) is None:
                raise PermissionDenied(
                    f"{principal.subject} cannot grant {wanted}: it does not hold it"
                    + (f" in namespace {namespace!r}" if namespace else ""),
                    reason="ESCALATION_DENIED",
                    metadata={"permission": wanted},
                )


def validate_role(role: Role) -> None:
    """Reject a malformed role."""
    check_name(role.name, "role.name")
    if not role.permissions:
        raise InvalidArgument(
            "a role needs at least one permission",
            field_violations=[FieldViolation("role.permissions", "must not be empty")],
        )
    for i, p in enumerate(role.permissions):
        check_permission_syntax(p, f"role.permissions[{i}]")


def validate_binding(binding: Binding) -> None:
    """Reject a malformed binding."""
    check_name(binding.name, "role_binding.name")
    check_name(binding.role, "role_binding.role")
    if binding.namespace:
        check_name(binding.namespace, "role_binding.namespace")
    if not binding.subjects:
        raise InvalidArgument(
            "a binding needs at least one subject",
            field_violations=[FieldViolation("role_binding.subjects", "must not be empty")],
        )
    for i, s in enumerate(binding.subjects):
        if s.kind not in SUBJECT_KINDS or not s.name:
            raise InvalidArgument(
                f"subject {i} is invalid",
                field_violations=[
                    FieldViolation(f"role_binding.subjects[{i}]", "needs a kind and a name")
                ],
            )


#: Roles every installation starts with.
BUILTIN_ROLES = (
    Role("admin", ("*",), "everything"),
    Role(
        "viewer",
        ("*.*.get", "*.*.list", "memory.documents.search", "audit.*.get"),
        "read-only access to every service",
    ),
    # Services calling each other: audit appends, event publishing, JWKS, token
    # exchange, and the RBAC watch every service's authorizer keeps open.
    Role(
        "mesh-service",
        (
            "audit.entries.append",
            "events.topics.publish",
            "auth.tokens.verify",
            "policy.decisions.evaluate",
            "auth.authorization.watch",
        ),
        "what one mesh service needs from the others",
    ),
    # machine-ops's own identity, beside mesh-service: it gives each enrolled
    # node an identity (a service account with the machineops-agent role; the
    # escalation check needs it to hold what it grants, hence agents.connect)
    # and searches memory-hub for documents about failed controls. Bound to
    # machine-ops only (SERVICE_ROLES), so no other service can mint accounts.
    Role(
        "machineops-service",
        (
            "auth.serviceaccounts.create",
            "auth.serviceaccounts.delete",
            "machineops.agents.connect",
            "memory.documents.search",
        ),
        "machine-ops: node identities and memory-hub context",
    ),
    # An enrolled node's agent: it may open its AgentSession, nothing else.
    Role("machineops-agent", ("machineops.agents.connect",), "a machine-ops node agent"),
)

#: The built-in roles a built-in service identity holds beyond ``mesh-service``.
SERVICE_ROLES: dict[str, tuple[str, ...]] = {"machine-ops": ("machineops-service",)}


def service_roles(service: str) -> list[str]:
    """The roles of the built-in identity of ``service`` (``system:<service>``)."""
    return ["mesh-service", *SERVICE_ROLES.get(service, ())]


def protect_builtin(name: str, action: str) -> None:
    """FAILED_PRECONDITION for changing or deleting a built-in role.

    The mesh runs on them (every service's identity holds ``mesh-service``,
    the first admin holds ``admin``): a deleted or narrowed one would leave
    the mesh running on roles that no longer mean what they did.
    """
    if any(r.name == name for r in BUILTIN_ROLES):
        raise FailedPrecondition(
            f"role {name!r} is built in and cannot be {action}; create a role of your own",
            reason="BUILTIN_ROLE",
            resource_type="role",
            resource_name=name,
        )
