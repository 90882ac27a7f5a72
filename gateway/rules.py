"""The HTTP bindings of every RPC, read from the ``google.api.http`` options.

This is the one reading of the rules: the router routes by these bindings and
the OpenAPI generator documents them, so the two cannot disagree. Rules are
checked once, at start (and at generation time): a template naming a missing
field, a body field that does not exist, a path variable bound to a repeated
or message field, or two bindings of the same shape stop the gateway with a
message naming the RPC.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor

from autoecoops.common.v1 import options_pb2
from autoecoops.gateway.codec import message_of
from autoecoops.gateway.templates import PathTemplate, TemplateError, parse
from autoecoops.kernel.mesh.config import DOMAIN_SERVICE

FD = descriptor.FieldDescriptor


class RuleError(ValueError):
    """An http rule the gateway cannot serve; the message names the RPC."""


@dataclass(frozen=True, slots=True)
class PathField:
    """A template variable resolved to the request field chain it sets."""

    dotted: str
    chain: tuple[descriptor.FieldDescriptor, ...]

    @property
    def leaf(self) -> descriptor.FieldDescriptor:
        """The scalar field that receives the value."""
        return self.chain[-1]


@dataclass(frozen=True, slots=True)
class Binding:
    """One HTTP binding of one RPC (a method has one per additional binding too)."""

    service: descriptor.ServiceDescriptor
    method: descriptor.MethodDescriptor
    #: GET, POST, PUT, PATCH, DELETE or a custom verb, upper case.
    http_method: str
    template: PathTemplate
    #: "" (no body), "*" (the whole request) or a top-level request field name.
    body: str
    #: "" (the whole response) or a top-level response field name.
    response_body: str
    #: 0 for the main rule, 1.. for additional_bindings.
    index: int
    #: The mesh service that serves the RPC (a name of the port table).
    backend: str
    path_fields: tuple[PathField, ...]
    public: bool
    permission: str

    @property
    def grpc_path(self) -> str:
        """``/package.Service/Method``."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def operation_id(self) -> str:
        """``Service_Method``; additional bindings get a number from 2 up, as grpc-gateway."""
        suffix = str(self.index + 1) if self.index else ""
        return f"{self.service.name}_{self.method.name}{suffix}"

    @property
    def body_field(self) -> descriptor.FieldDescriptor | None:
        """The request field the body fills, when the body is one field."""
        if self.body in ("", "*"):
            return None
        return self.method.input_type.fields_by_name[self.body]

    @property
    def response_field(self) -> descriptor.FieldDescriptor | None:
        """The response field sent as the body, when ``response_body`` is set."""
        if not self.response_body:
            return None
        return self.method.output_type.fields_by_name[self.response_body]

    @property
    def client_streaming(self) -> bool:
        """True when the request is a stream (the body is NDJSON)."""
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        """True when the response is a stream (NDJSON or SSE)."""
        return bool(self.method.server_streaming)

    def bound_paths(self) -> tuple[str, ...]:
        """Field paths set by the path or the body; query parameters cannot touch them."""
        bound = [p.dotted for p in self.path_fields]
        if self.body:
            bound.append(self.body)
        return tuple(bound)


def backend_of(service: descriptor.ServiceDescriptor) -> str:
    """The mesh service of a gRPC service, from its proto package."""
    parts = service.full_name.split(".")
    domain = parts[1] if len(parts) > 3 and parts[0] == "autoecoops" else ""
    try:
        return DOMAIN_SERVICE[domain]
    except KeyError:
        raise RuleError(f"{service.full_name}: no mesh service serves package {domain!r}") from None


def method_policy(method: descriptor.MethodDescriptor) -> options_pb2.MethodPolicy:
    """The ``(autoecoops.common.v1.method)`` option (empty when absent)."""
    policy: options_pb2.MethodPolicy = method.GetOptions().Extensions[options_pb2.method]
    return policy


def http_rule(method: descriptor.MethodDescriptor) -> http_pb2.HttpRule | None:
    """The ``google.api.http`` option of a method, or None."""
    opts = method.GetOptions()
    if not opts.HasExtension(annotations_pb2.http):
        return None
    rule: http_pb2.HttpRule = opts.Extensions[annotations_pb2.http]
    return rule


def bindings_of(
    service: descriptor.ServiceDescriptor, backend: str | None = None
) -> Iterator[Binding]:
    """Every binding of every method of ``service`` that has an http rule."""
    target = backend or backend_of(service)
    for method in service.methods:
        rule = http_rule(method)
        if rule is None:
            continue
        rules = [rule, *rule.additional_bindings]
        for index, r in enumerate(rules):
            if index and r.additional_bindings:
                raise RuleError(f"{method.full_name}: additional_bindings cannot nest")
            yield _binding(service, method, r, index, target)


def _binding(
    service: descriptor.ServiceDescriptor,
    method: descriptor.MethodDescriptor,
    rule: http_pb2.HttpRule,
    index: int,
    backend: str,
) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise RuleError(f"{method.full_name}: http rule without a method and path")
    if kind == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, path = kind.upper(), getattr(rule, kind)
    try:
        template = parse(path)
    except TemplateError as err:
        raise RuleError(f"{method.full_name}: {err}") from None
    request = method.input_type
    path_fields = tuple(
        PathField(v.dotted, _path_chain(method, request, v.field_path)) for v in template.variables
    )
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise RuleError(f"{method.full_name}: body field {rule.body!r} is not in {request.name}")
    if rule.body and verb in ("GET", "DELETE"):
        # http.proto forbids it: clients and proxies drop GET/DELETE bodies.
        raise RuleError(f"{method.full_name}: {verb} cannot carry a body")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise RuleError(
            f"{method.full_name}: response_body {rule.response_body!r} is not in "
            f"{method.output_type.name}"
        )
    policy = method_policy(method)
    return Binding(
        service=service,
        method=method,
        http_method=verb,
        template=template,
        body=rule.body,
        response_body=rule.response_body,
        index=index,
        backend=backend,
        path_fields=path_fields,
        public=policy.public,
        permission=policy.permission,
    )


def _path_chain(
    method: descriptor.MethodDescriptor, msg: descriptor.Descriptor, names: tuple[str, ...]
) -> tuple[descriptor.FieldDescriptor, ...]:
    chain: list[descriptor.FieldDescriptor] = []
    for i, name in enumerate(names):
        field = msg.fields_by_name.get(name)
        where = ".".join(names)
        if field is None:
            raise RuleError(f"{method.full_name}: path variable {where!r}: no field {name!r}")
        if field.is_repeated:
            raise RuleError(f"{method.full_name}: path variable {where!r} is repeated")
        last = i == len(names) - 1
        if last and field.type == FD.TYPE_MESSAGE:
            raise RuleError(f"{method.full_name}: path variable {where!r} is a message")
        if not last:
            if field.type != FD.TYPE_MESSAGE:
                raise RuleError(f"{method.full_name}: path variable {where!r}: {name} is scalar")
            msg = message_of(field)
        chain.append(field)
    return tuple(chain)


def check_unique(bindings: Iterable[Binding]) -> list[Binding]:
    """The bindings as a list; raise ``RuleError`` if two have the same method and shape."""
    seen: dict[tuple[object, ...], Binding] = {}
    out = []
    for b in bindings:
        shape = (
            b.http_method,
            tuple((s.kind, s.text) for s in b.template.segments),
            b.template.verb,
        )
        other = seen.get(shape)
        if other is not None:
            raise RuleError(
                f"{b.method.full_name} and {other.method.full_name} both bind "
                f"{b.http_method} {b.template.source}"
            )
        seen[shape] = b
        out.append(b)
    return out


def generated_modules() -> list[ModuleType]:
    """Import every generated ``autoecoops.<domain>.v1.*_pb2`` module."""
    root = importlib.import_module("autoecoops")
    modules = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda i: i.name):
        if not info.ispkg or importlib.util.find_spec(f"autoecoops.{info.name}.v1") is None:
            continue
        pkg = importlib.import_module(f"autoecoops.{info.name}.v1")
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if mod.name.endswith("_pb2"):
                modules.append(importlib.import_module(f"{pkg.__name__}.{mod.name}"))
    return modules


def services_of(files: Iterable[descriptor.FileDescriptor]) -> list[descriptor.ServiceDescriptor]:
    """The services declared in ``files``, in a stable order."""
    services = [s for f in files for s in f.services_by_name.values()]
    return sorted(services, key=lambda s: s.full_name)


def mesh_bindings(
    services: Iterable[descriptor.ServiceDescriptor] | None = None,
    backend: Callable[[descriptor.ServiceDescriptor], str] = backend_of,
) -> list[Binding]:
    """The bindings of the mesh's services (all generated ones by default), checked."""
    if services is None:
        services = services_of(m.DESCRIPTOR for m in generated_modules())
    return check_unique(b for s in services for b in bindings_of(s, backend(s)))
