"""What the contracts say about each RPC, read once from the descriptors.

The ``(autoecoops.common.v1.method)`` option is the single source of an RPC's
permission, idempotency and audit flag; ``google.api.field_behavior`` marks
required fields. Interceptors, the SDK and the generators read them here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from google.api import field_behavior_pb2
from google.protobuf import descriptor, descriptor_pool, message, message_factory

from autoecoops.common.v1 import options_pb2
from autoecoops.kernel.mesh.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC as the mesh sees it."""

    #: ``/package.Service/Method``, the gRPC path.
    path: str
    #: ``package.Service.Method``.
    full_name: str
    permission: str
    idempotent: bool
    audited: bool
    public: bool
    #: Dotted request field naming the namespace RBAC is checked in ('' = cluster-wide).
    namespace_field: str
    #: Dotted request field holding the audited resource ('' = the usual names).
    resource_field: str
    client_streaming: bool
    server_streaming: bool
    request_type: type[message.Message]
    response_type: type[message.Message]
    #: Checks required fields; returns the violations (empty when valid).
    validate: Callable[[message.Message], list[FieldViolation]]


def method_policy(method: descriptor.MethodDescriptor) -> options_pb2.MethodPolicy:
    """The method option of ``method`` (an empty policy when absent)."""
    opts = method.GetOptions()
    return opts.Extensions[options_pb2.method]


def services_in(file: descriptor.FileDescriptor) -> Iterator[descriptor.ServiceDescriptor]:
    """The services declared in one proto file."""
    yield from file.services_by_name.values()


@functools.cache
def method_info(path: str) -> MethodInfo | None:
    """Look up ``/package.Service/Method`` in the default pool; None if unknown."""
    service_name, _, method_name = path.lstrip("/").partition("/")
    try:
        svc = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    method = svc.methods_by_name.get(method_name)
    if method is None:
        return None
    policy = method_policy(method)
    req = message_factory.GetMessageClass(method.input_type)
    return MethodInfo(
        path=path,
        full_name=method.full_name,
        permission=policy.permission,
        idempotent=policy.idempotent,
        audited=policy.audited,
        public=policy.public,
        namespace_field=policy.namespace_field,
        resource_field=policy.resource_field,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        request_type=req,
        response_type=message_factory.GetMessageClass(method.output_type),
        validate=required_fields_validator(method.input_type),
    )


@functools.cache
def idempotent_methods(package: str) -> tuple[tuple[str, str], ...]:
    """(service, method) of every idempotent RPC of proto package ``package``
    (``autoecoops.auth.v1``), from its generated ``_pb2`` modules."""
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return ()
    found: list[tuple[str, str]] = []
    for mod in sorted(pkgutil.iter_modules(getattr(pkg, "__path__", [])), key=lambda m: m.name):
        if not mod.name.endswith("_pb2"):
            continue
        file = importlib.import_module(f"{package}.{mod.name}").DESCRIPTOR
        for svc in services_in(file):
            found += [
                (svc.full_name, m.name)
                for m in svc.methods
                if method_policy(m).idempotent and not m.client_streaming
            ]
    return tuple(found)


def _required(field: descriptor.FieldDescriptor) -> bool:
    behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    return field_behavior_pb2.REQUIRED in behaviors


_NUMERIC = {
    descriptor.FieldDescriptor.TYPE_DOUBLE,
    descriptor.FieldDescriptor.TYPE_FLOAT,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_FIXED32,
    descriptor.FieldDescriptor.TYPE_BOOL,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_SFIXED32,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_SINT64,
}


def _is_set(msg: message.Message, field: descriptor.FieldDescriptor) -> bool:
    value = getattr(msg, field.name)
    if field.is_repeated:
        return len(value) > 0
    if field.has_presence:
        return msg.HasField(field.name)
    if field.type in _NUMERIC:
        # proto3 cannot tell 0 (or false) from unset: index 0 is a real index.
        return True
    # Strings, bytes and enums: empty and *_UNSPECIFIED mean "not given".
    return bool(value)


def required_fields_validator(
    desc: descriptor.Descriptor,
) -> Callable[[message.Message], list[FieldViolation]]:
    """A checker for the REQUIRED fields of ``desc`` and of its set sub-messages.

    A request with an ``update_mask`` is partial by design (AIP-134), so only
    its own top-level required fields are checked, not the resource's.
    """
    partial = "update_mask" in desc.fields_by_name
    plan = _plan(desc, frozenset(), descend=not partial)
    if plan is None:
        return lambda _msg: []

    def validate(msg: message.Message) -> list[FieldViolation]:
        out: list[FieldViolation] = []
        _check(plan, msg, "", out)
        return out

    return validate


# A plan per message type: (required fields, sub-message fields to descend into).
_Plan = tuple[
    tuple[descriptor.FieldDescriptor, ...],
    tuple[tuple[descriptor.FieldDescriptor, "_Plan"], ...],
]


def _plan(desc: descriptor.Descriptor, seen: frozenset[str], descend: bool = True) -> _Plan | None:
    if desc.full_name in seen or desc.full_name.startswith("google.protobuf."):
        return None
    seen = seen | {desc.full_name}
    required = tuple(f for f in desc.fields if _required(f))
    nested: list[tuple[descriptor.FieldDescriptor, _Plan]] = []
    if descend:
        for f in desc.fields:
            sub_type = f.message_type
            if sub_type is not None and not sub_type.GetOptions().map_entry:
                sub = _plan(sub_type, seen)
                if sub is not None:
                    nested.append((f, sub))
    if not required and not nested:
        return None
    return required, tuple(nested)


def _check(plan: _Plan, msg: message.Message, prefix: str, out: list[FieldViolation]) -> None:
    required, nested = plan
    for f in required:
        if not _is_set(msg, f):
            out.append(FieldViolation(prefix + f.name, "required field is missing"))
    for f, sub in nested:
        if f.is_repeated:
            for i, item in enumerate(getattr(msg, f.name)):
                _check(sub, item, f"{prefix}{f.name}[{i}].", out)
        elif msg.HasField(f.name):
            _check(sub, getattr(msg, f.name), f"{prefix}{f.name}.", out)


def field_value(msg: message.Message, path: str) -> str:
    """The string at dotted ``path`` in ``msg`` ('' when unset)."""
    value: object = msg
    for part in path.split("."):
        value = getattr(value, part, "")
    return value if isinstance(value, str) else ""
