"""The OpenAPI 3.1 document of the REST API, built from the same bindings the
gateway routes by (``rules.py``), so the document and the gateway cannot
disagree.

``scripts/gen_openapi.py`` builds it from the descriptor set with comments
(every description comes from the proto comments) into gen/openapi/; the
gateway serves that file, or builds the same document without descriptions
when the file is missing or does not match its routes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import descriptor, descriptor_pb2

from autoecoops.gateway.codec import STRING_FORM, WRAPPERS, enum_of, is_map, message_of
from autoecoops.gateway.rules import Binding, method_policy
from autoecoops.gateway.templates import LITERAL, PathTemplate, Variable

FD = descriptor.FieldDescriptor
Schema = dict[str, Any]

STATUS = "google.rpc.Status"
ANY = "google.protobuf.Any"
BEARER = "bearer"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON = "application/json"

INTRO = """\
REST access to every AutoEcoOps service, transcoded to gRPC by the gateway
from the `google.api.http` rules of the protos (the same rules this document
is generated from).

* **JSON**: the proto3 JSON mapping. Requests accept a field's camelCase JSON
  name or its proto name; an unknown field is a 400. Responses use camelCase
  and contain every field without presence, even at its default value;
  64-bit integers are strings, enums are names, Timestamps RFC 3339.
* **Query parameters** set the request fields the path and body do not:
  `a.b=1` for nested fields, `p=x&p=y` for repeated ones, enums by name,
  Timestamp / Duration / FieldMask / wrappers in their JSON string form.
  Giving a non-repeated parameter twice is a 400. Parameters that name no
  field are ignored.
* **Errors** are a `google.rpc.Status` (`code`, `message`, `details` with
  `@type`), with grpc-gateway's HTTP status for each gRPC code. A 401 carries
  `WWW-Authenticate: Bearer`. A method not allowed on a known path is a 405
  with `Allow`.
* **Headers**: `Authorization` is forwarded; `Grpc-Metadata-X` becomes gRPC
  metadata `x`; `traceparent`/`tracestate` join the backend's trace;
  `Grpc-Timeout` (e.g. `500m`) or `X-Request-Timeout` (seconds) set the
  deadline. Response metadata comes back as `Grpc-Metadata-*` and
  `Grpc-Trailer-*` headers.
* **Streams**: a server stream is newline-delimited JSON, one
  `{"result": ...}` per message and `{"error": Status}` if it fails after the
  first message; with `Accept: text/event-stream` it is Server-Sent Events
  (`data:` per message, `event: error` on failure). A client stream's body is
  newline-delimited JSON, one request per line.
"""

_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_SCALARS: dict[int, Schema] = {
    FD.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FD.TYPE_FLOAT: {
        "type": "number",
        "format": "float",
        "minimum": -3.4028234663852886e38,
        "maximum": 3.4028234663852886e38,
    },
    FD.TYPE_INT32: _INT32,
    FD.TYPE_SINT32: _INT32,
    FD.TYPE_SFIXED32: _INT32,
    FD.TYPE_UINT32: _UINT32,
    FD.TYPE_FIXED32: _UINT32,
    FD.TYPE_INT64: _INT64,
    FD.TYPE_SINT64: _INT64,
    FD.TYPE_SFIXED64: _INT64,
    FD.TYPE_UINT64: _UINT64,
    FD.TYPE_FIXED64: _UINT64,
    FD.TYPE_BOOL: {"type": "boolean"},
    FD.TYPE_STRING: {"type": "string"},
    FD.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, e.g. 2024-05-01T12:00:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with an `s` suffix, e.g. 1.5s.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in camelCase, e.g. description,permissions.",
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
}
_WRAPPED = {
    "Double": FD.TYPE_DOUBLE,
    "Float": FD.TYPE_FLOAT,
    "Int64": FD.TYPE_INT64,
    "UInt64": FD.TYPE_UINT64,
    "Int32": FD.TYPE_INT32,
    "UInt32": FD.TYPE_UINT32,
    "Bool": FD.TYPE_BOOL,
    "String": FD.TYPE_STRING,
    "Bytes": FD.TYPE_BYTES,
}

#: The error responses every operation declares: key, HTTP status, description.
_ERRORS = (
    (
        "BadRequest",
        "400",
        "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE: the request "
        "is wrong; BadRequest details name the fields.",
    ),
    ("Unauthenticated", "401", "UNAUTHENTICATED: no valid bearer token."),
    ("PermissionDenied", "403", "PERMISSION_DENIED: the caller lacks the method's permission."),
    ("NotFound", "404", "NOT_FOUND: the resource (or the path) does not exist."),
    ("PayloadTooLarge", "413", "The body is over the gateway's limit."),
    ("NotImplemented", "501", "UNIMPLEMENTED: the method is in the contract but not served yet."),
    ("Unavailable", "503", "UNAVAILABLE: the service is down; retry with backoff."),
)


def comments_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """Proto comments keyed by full name (messages, fields, enums, values, services, methods)."""
    out: dict[str, str] = {}
    for f in files:
        names: dict[tuple[int, ...], str] = {}
        prefix = f.package + "." if f.package else ""
        for i, msg in enumerate(f.message_type):
            _name_message(names, (4, i), prefix + msg.name, msg)
        for i, enum in enumerate(f.enum_type):
            _name_enum(names, (5, i), prefix + enum.name, enum)
        for i, svc in enumerate(f.service):
            names[(6, i)] = prefix + svc.name
            for j, m in enumerate(svc.method):
                names[(6, i, 2, j)] = f"{prefix}{svc.name}.{m.name}"
        for loc in f.source_code_info.location:
            key = names.get(tuple(loc.path))
            text = loc.leading_comments or loc.trailing_comments
            if key and text.strip():
                out[key] = _clean(text)
    return out


def _name_message(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full: str,
    msg: descriptor_pb2.DescriptorProto,
) -> None:
    names[path] = full
    for j, fld in enumerate(msg.field):
        names[(*path, 2, j)] = f"{full}.{fld.name}"
    for j, nested in enumerate(msg.nested_type):
        _name_message(names, (*path, 3, j), f"{full}.{nested.name}", nested)
    for j, enum in enumerate(msg.enum_type):
        _name_enum(names, (*path, 4, j), f"{full}.{enum.name}", enum)


def _name_enum(
    names: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    full: str,
    enum: descriptor_pb2.EnumDescriptorProto,
) -> None:
    names[path] = full
    for j, value in enumerate(enum.value):
        names[(*path, 2, j)] = f"{full}.{value.name}"


def _clean(text: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()


class SchemaBuilder:
    """JSON Schemas of proto messages and enums (the proto3 JSON mapping), as
    ``components/schemas`` entries added when first referenced. Shared with the
    AsyncAPI generator, so events and REST describe messages the same way."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.components: dict[str, Schema] = {}
        self._pending: list[descriptor.Descriptor | descriptor.EnumDescriptor] = []

    def ref(self, desc: descriptor.Descriptor | descriptor.EnumDescriptor) -> Schema:
        """A ``$ref`` to the component of ``desc`` (built by ``finish``)."""
        name = desc.full_name
        if name not in self.components:
            self.components[name] = {}  # reserved, so recursion terminates
            self._pending.append(desc)
        return {"$ref": f"#/components/schemas/{name}"}

    def finish(self) -> dict[str, Schema]:
        """Build every referenced component; return them sorted by name."""
        while self._pending:
            desc = self._pending.pop()
            if isinstance(desc, descriptor.EnumDescriptor):
                self.components[desc.full_name] = self.enum(desc)
            else:
                self.components[desc.full_name] = self.message(desc)
        return dict(sorted(self.components.items()))

    def enum(self, desc: descriptor.EnumDescriptor) -> Schema:
        """An enum as a string schema of its value names, values described."""
        lines = [
            f"- `{v.name}`: {self.comments.get(f'{desc.full_name}.{v.name}', '')}".rstrip(": ")
            for v in desc.values
        ]
        text = self.comments.get(desc.full_name, "")
        schema: Schema = {"type": "string", "enum": [v.name for v in desc.values]}
        schema["description"] = (text + "\n\n" if text else "") + "\n".join(lines)
        return schema

    def message(self, desc: descriptor.Descriptor, skip: Sequence[str] = ()) -> Schema:
        """A message as an object schema (without the fields named in ``skip``)."""
        if desc.full_name == ANY:
            return {
                "type": "object",
                "description": "A message of any type, named by `@type`, with its fields beside it.",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
                "additionalProperties": True,
            }
        props: dict[str, Schema] = {}
        required: list[str] = []
        for f in desc.fields:
            if f.name in skip:
                continue
            props[f.json_name] = self.field(f)
            if _behaviors(f) & {field_behavior_pb2.REQUIRED}:
                required.append(f.json_name)
        schema: Schema = {"type": "object"}
        text = self.comments.get(desc.full_name)
        if text:
            schema["description"] = text
        schema["properties"] = props
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False
        exclusive = [
            [f.json_name for f in o.fields if f.name not in skip]
            for o in desc.oneofs
            if len(o.fields) > 1
        ]
        pairs = [
            {"required": [a, b]}
            for group in exclusive
            for i, a in enumerate(group)
            for b in group[i + 1 :]
        ]
        if pairs:
            # A oneof: at most one of its fields may be set.
            schema["not"] = {"anyOf": pairs}
        return schema

    def field(self, f: descriptor.FieldDescriptor) -> Schema:
        """The schema of a field: maps, arrays, or one value, with its description."""
        if is_map(f):
            entry = message_of(f)
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            schema: Schema = {"type": "object", "additionalProperties": self.single(value)}
            if key.type != FD.TYPE_STRING:
                schema["propertyNames"] = (
                    {"enum": ["true", "false"]}
                    if key.type == FD.TYPE_BOOL
                    else {"pattern": "^-?[0-9]+$"}
                )
        elif f.is_repeated:
            schema = {"type": "array", "items": self.single(f)}
        else:
            schema = self.single(f)
        return _describe(schema, self.comments.get(f.full_name, ""), f)

    def single(self, f: descriptor.FieldDescriptor) -> Schema:
        """The schema of one value of ``f`` (an array item, a map value, or the field)."""
        if f.type == FD.TYPE_MESSAGE:
            return self.message_type(message_of(f))
        if f.type == FD.TYPE_ENUM:
            return self.ref(enum_of(f))
        return dict(_SCALARS[f.type])

    def message_type(self, desc: descriptor.Descriptor) -> Schema:
        """A message-typed value: inline for well-known types, else a ``$ref``."""
        name = desc.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name in WRAPPERS:
            return dict(
                _SCALARS[_WRAPPED[name.removeprefix("google.protobuf.").removesuffix("Value")]]
            )
        return self.ref(desc)


#: The name scripts/gen_asyncapi.py imported first; ``SchemaBuilder`` is the public one.
_Schemas = SchemaBuilder


def _behaviors(f: descriptor.FieldDescriptor) -> set[int]:
    return set(f.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _describe(schema: Schema, text: str, f: descriptor.FieldDescriptor) -> Schema:
    behaviors = _behaviors(f)
    if field_behavior_pb2.OUTPUT_ONLY in behaviors:
        schema["readOnly"] = True
    if field_behavior_pb2.INPUT_ONLY in behaviors:
        schema["writeOnly"] = True
    if field_behavior_pb2.IMMUTABLE in behaviors:
        text = (text + " " if text else "") + "Immutable once set."
    if text:
        schema["description"] = text
    return schema


def _path_of(template: PathTemplate) -> tuple[str, list[tuple[str, Variable, int]]]:
    """The OpenAPI path of a template and its parameters (name, variable, wildcard index).

    A multi-segment variable such as ``{name=projects/*/things/*}`` is written
    out as ``projects/{project}/things/{thing}``: generic clients escape a
    ``/`` inside a parameter, which such a variable must not contain.
    """
    parts: list[str] = []
    params: list[tuple[str, Variable, int]] = []
    by_start = {v.start: v for v in template.variables}
    used: set[str] = set()
    i = 0
    while i < len(template.segments):
        var = by_start.get(i)
        if var is None:
            seg = template.segments[i]
            parts.append(seg.text if seg.kind == LITERAL else "{_" + str(i) + "}")
            if seg.kind != LITERAL:
                params.append(("_" + str(i), Variable(("_" + str(i),), i, i + 1, (seg,)), -1))
            i += 1
            continue
        if var.single_segment:
            name = _param_name(var.dotted)
            parts.append("{" + name + "}")
            params.append((name, var, -1))
        else:
            previous = ""
            wildcards = sum(1 for seg in var.pattern if seg.kind != LITERAL)
            for k, seg in enumerate(var.pattern):
                if seg.kind == LITERAL:
                    parts.append(seg.text)
                    previous = seg.text
                    continue
                name = _param_name(var.dotted) if wildcards == 1 else _singular(previous)
                if not name or name in used:
                    name = f"{_param_name(var.dotted)}_{k}"
                used.add(name)
                parts.append("{" + name + "}")
                params.append((name, var, k))
        i = var.end
    path = "/" + "/".join(parts)
    return path + (":" + template.verb if template.verb else ""), params


def _param_name(field_path: str) -> str:
    # "role.name" -> "role_name": a dot in a path parameter name is legal
    # OpenAPI, but tools that fill templates with str.format (schemathesis,
    # several generators) read it as attribute access.
    return field_path.replace(".", "_")


def _singular(collection: str) -> str:
    # "projects" -> "project", "policies" -> "policy": names for the
    # parameters of a spelled-out resource name.
    if collection.endswith("ies") and len(collection) > 3:
        return collection[:-3] + "y"
    if collection.endswith("s") and len(collection) > 1:
        return collection[:-1]
    return ""


class _Builder:
    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.schemas = SchemaBuilder(comments)

    def operation(self, b: Binding) -> tuple[str, Schema]:
        path, path_params = _path_of(b.template)
        method_doc = self.comments.get(b.method.full_name, "")
        summary = _summary(method_doc) or f"{b.method.name}"
        notes = [f"gRPC: `{b.method.full_name}`."]
        if b.public:
            notes.append("Public: no token needed.")
        elif b.permission:
            notes.append(f"Permission: `{b.permission}`.")
        policy = method_policy(b.method)
        if policy.idempotent:
            notes.append("Idempotent: safe to retry.")
        if policy.audited:
            notes.append("Audited.")
        if b.server_streaming:
            notes.append(
                "The response is a stream (NDJSON, or SSE with `Accept: text/event-stream`)."
            )
        if b.client_streaming:
            notes.append("The body is newline-delimited JSON, one request message per line.")
        op: Schema = {
            "operationId": b.operation_id,
            "tags": [b.service.name],
            "summary": summary,
            "description": "\n\n".join(x for x in (method_doc, " ".join(notes)) if x),
            "x-grpc-method": b.method.full_name,
        }
        params = [self.path_param(b, name, var, k) for name, var, k in path_params]
        params += self.query_params(b)
        if params:
            op["parameters"] = params
        if b.body:
            op["requestBody"] = self.request_body(b)
        op["responses"] = self.responses(b)
        op["security"] = [] if b.public else [{BEARER: []}]
        return path, op

    def path_param(self, b: Binding, name: str, var: Variable, k: int) -> Schema:
        leaf = next((pf.leaf for pf in b.path_fields if pf.dotted == var.dotted), None)
        if leaf is None:  # an unnamed wildcard segment
            return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        if k < 0:
            schema = self.schemas.field(leaf)
            if not var.single_segment:
                schema["pattern"] = var.regex
            if schema.get("type") == "string":
                schema["minLength"] = 1  # an empty segment matches no route
            description = self.comments.get(leaf.full_name, "")
            if name != var.dotted:
                description = f"Sets `{var.dotted}`. {description}".strip()
        elif var.pattern[k].kind == "**":
            # The rest of the path, in one parameter: the router decodes an
            # escaped slash here, so a client that escapes it (every
            # generated one does) and one that does not reach the same RPC.
            schema = {"type": "string", "pattern": "^[^/]+(/[^/]+)*$"}
            description = (
                f"The rest of the path (`{var.dotted}`): segments separated by `/`, "
                "sent as is or escaped as `%2F` (both mean the same)."
            )
        else:
            schema = (
                {"type": "string", "pattern": "^[^/]+$"}
                if var.pattern[k].kind == "*"
                else {"type": "string"}
            )
            description = f"A segment of `{var.dotted}` (`{'/'.join(s.text or s.kind for s in var.pattern)}`)."
        schema.pop("description", None)
        param: Schema = {"name": name, "in": "path", "required": True, "schema": schema}
        if description:
            param["description"] = description
        return param

    def query_params(self, b: Binding) -> list[Schema]:
        if b.body == "*":
            return []
        bound = b.bound_paths()
        out: list[Schema] = []
        self._query(b.method.input_type, "", "", bound, out, (b.method.input_type.full_name,))
        return out

    def _query(
        self,
        desc: descriptor.Descriptor,
        proto_prefix: str,
        json_prefix: str,
        bound: Sequence[str],
        out: list[Schema],
        seen: tuple[str, ...],
    ) -> None:
        for f in desc.fields:
            proto_path = proto_prefix + f.name
            # A field bound by the path or body (or inside one) is not a
            # parameter; the other fields of a message that holds one are.
            if any(proto_path == x or proto_path.startswith(x + ".") for x in bound):
                continue
            name = json_prefix + f.json_name
            if is_map(f):
                continue
            if f.type == FD.TYPE_MESSAGE and message_of(f).full_name not in STRING_FORM:
                sub = message_of(f)
                if (
                    f.is_repeated
                    or sub.full_name.startswith("google.protobuf.")
                    or sub.full_name in seen
                ):
                    continue
                self._query(sub, proto_path + ".", name + ".", bound, out, (*seen, sub.full_name))
                continue
            schema = self.schemas.field(f)
            description = schema.pop("description", "")
            param: Schema = {"name": name, "in": "query", "schema": schema}
            if f.is_repeated:
                param["style"] = "form"
                param["explode"] = True
            if field_behavior_pb2.REQUIRED in _behaviors(f) and not proto_prefix:
                param["required"] = True
            if description:
                param["description"] = description
            out.append(param)

    def request_body(self, b: Binding) -> Schema:
        if b.body == "*":
            skip = [pf.chain[0].name for pf in b.path_fields if len(pf.chain) == 1]
            desc = b.method.input_type
            if skip:
                name = f"{b.service.full_name}.{b.method.name}Body"
                body = self.schemas.message(desc, skip)
                body["description"] = (
                    f"{desc.full_name} without the fields bound by the path ({', '.join(skip)})."
                )
                self.schemas.components[name] = body
                schema: Schema = {"$ref": f"#/components/schemas/{name}"}
            else:
                schema = self.schemas.ref(desc)
        else:
            field = b.body_field
            assert field is not None
            schema = self.schemas.field(field)
        if b.client_streaming:
            return {
                "required": True,
                "content": {NDJSON: {"schema": schema}},
            }
        return {"required": b.body != "*", "content": {JSON: {"schema": schema}}}

    def responses(self, b: Binding) -> Schema:
        field = b.response_field
        schema = (
            self.schemas.field(field)
            if field is not None
            else self.schemas.ref(b.method.output_type)
        )
        if b.server_streaming:
            item = {
                "type": "object",
                "properties": {
                    "result": schema,
                    "error": {"$ref": f"#/components/schemas/{STATUS}"},
                },
            }
            content: Schema = {
                NDJSON: {"schema": item},
                SSE: {
                    "schema": {
                        "type": "string",
                        "description": "`data: <message JSON>` per message.",
                    }
                },
            }
        else:
            content = {JSON: {"schema": schema}}
        desc = self.comments.get(b.method.output_type.full_name, "") or "OK"
        out: Schema = {"200": {"description": _summary(desc) or "OK", "content": content}}
        for key, code, _ in _ERRORS:
            if code in ("401", "403") and b.public:
                continue
            if code == "413" and not b.body:
                continue
            out[code] = {"$ref": f"#/components/responses/{key}"}
        out["default"] = {"$ref": "#/components/responses/Error"}
        return out


def _summary(text: str) -> str:
    first = text.strip().split("\n\n")[0].replace("\n", " ")
    m = re.match(r"^(.+?\.)(\s|$)", first)
    return (m.group(1) if m else first)[:200]


def _status_schemas() -> dict[str, Schema]:
    return {
        STATUS: {
            "type": "object",
            "description": "google.rpc.Status: a gRPC code, a message for developers, and typed details "
            "(google.rpc.ErrorInfo, BadRequest, RetryInfo, ResourceInfo...).",
            "properties": {
                "code": {
                    "type": "integer",
                    "format": "int32",
                    "description": "The google.rpc.Code.",
                },
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"$ref": f"#/components/schemas/{ANY}"}},
            },
            "required": ["code", "message", "details"],
        },
        "autoecoops.gateway.Health": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]},
                "backends": {
                    "type": "object",
                    "description": "grpc.health.v1 status per mesh service (or the gRPC error code).",
                    "additionalProperties": {"type": "string"},
                },
            },
            "required": ["status", "backends"],
        },
    }


def _error_responses() -> dict[str, Schema]:
    status = {"content": {JSON: {"schema": {"$ref": f"#/components/schemas/{STATUS}"}}}}
    out: dict[str, Schema] = {}
    for key, _, text in _ERRORS:
        out[key] = {"description": text, **status}
    out["Unauthenticated"]["headers"] = {
        "WWW-Authenticate": {
            "description": '`Bearer realm="autoecoops"`.',
            "schema": {"type": "string"},
        }
    }
    out["Error"] = {
        "description": "Any other error, as a google.rpc.Status: 409 ALREADY_EXISTS or ABORTED, "
        "429 RESOURCE_EXHAUSTED (see Retry-After), 499 CANCELLED, 500 INTERNAL/UNKNOWN/DATA_LOSS "
        "(quote the error_id), 504 DEADLINE_EXCEEDED.",
        **status,
    }
    return out


def _health_operation() -> Schema:
    health = {
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/autoecoops.gateway.Health"}}}
    }
    return {
        "get": {
            "operationId": "Gateway_Health",
            "tags": ["Gateway"],
            "summary": "Aggregated grpc.health.v1 of every backend.",
            "responses": {
                "200": {"description": "Every backend is SERVING.", **health},
                "503": {"description": "Some backend is not SERVING.", **health},
            },
            "security": [],
        }
    }


def build_document(
    bindings: Sequence[Binding],
    comments: Mapping[str, str] | None = None,
    version: str = "v1",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``bindings`` (descriptions from ``comments``)."""
    builder = _Builder(comments or {})
    paths: dict[str, dict[str, Schema]] = {"/healthz": _health_operation()}
    tags: dict[str, Schema] = {}
    for b in bindings:
        path, op = builder.operation(b)
        verb = b.http_method.lower()
        if verb not in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
            raise ValueError(f"{b.method.full_name}: OpenAPI has no method {b.http_method}")
        paths.setdefault(path, {})[verb] = op
        tag: Schema = {"name": b.service.name}
        text = (comments or {}).get(b.service.full_name)
        if text:
            tag["description"] = text
        tags.setdefault(b.service.name, tag)
    schemas = builder.schemas.finish()
    schemas.update(_status_schemas())
    schemas.setdefault(ANY, builder.schemas.message(_any_descriptor()))
    return {
        "openapi": "3.1.0",
        "info": {"title": "AutoEcoOps API", "version": version, "description": INTRO},
        "tags": [
            *sorted(tags.values(), key=lambda t: t["name"]),
            {"name": "Gateway", "description": "The gateway's own endpoints."},
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "responses": _error_responses(),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from auth-service (POST /v1/auth/token).",
                }
            },
        },
    }


def _any_descriptor() -> descriptor.Descriptor:
    from google.protobuf import any_pb2

    return any_pb2.Any.DESCRIPTOR


def route_keys(document: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """(path, method, operationId) of every operation: what must match to serve a document."""
    return {
        (path, verb, op.get("operationId", ""))
        for path, ops in document.get("paths", {}).items()
        for verb, op in ops.items()
        if isinstance(op, dict)
    }
