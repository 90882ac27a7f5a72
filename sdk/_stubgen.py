"""Generate ``services.pyi``: the static types of every sub-client, from the
same descriptors the SDK reads at run time.

    python -m autoecoops.sdk._stubgen           # rewrite sdk/services.pyi
    python -m autoecoops.sdk._stubgen --check   # exit 1 when it is stale

Each RPC gets its request and response types from the generated messages,
and its keyword arguments from the request's fields (a TypedDict per
request, typed as mypy-protobuf types the message constructor). The
docstrings are the proto comments, taken from mypy-protobuf's ``_pb2_grpc.pyi``
stubs, and the method option (permission, idempotent, public).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import keyword
import subprocess
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor

from autoecoops.kernel.mesh.descriptors import MethodInfo, method_info
from autoecoops.sdk import catalog
from autoecoops.sdk.subclients import HELPERS

OUT = Path(__file__).with_name("services.pyi")
#: Keyword arguments every method takes; a request field of the same name
#: must be passed in a request message.
OPTIONS = {"timeout", "retry", "metadata"}
_F = descriptor.FieldDescriptor
_SCALARS = {
    _F.TYPE_DOUBLE: "float",
    _F.TYPE_FLOAT: "float",
    _F.TYPE_INT64: "int",
    _F.TYPE_UINT64: "int",
    _F.TYPE_INT32: "int",
    _F.TYPE_FIXED64: "int",
    _F.TYPE_FIXED32: "int",
    _F.TYPE_BOOL: "bool",
    _F.TYPE_STRING: "str",
    _F.TYPE_BYTES: "bytes",
    _F.TYPE_UINT32: "int",
    _F.TYPE_SFIXED32: "int",
    _F.TYPE_SFIXED64: "int",
    _F.TYPE_SINT32: "int",
    _F.TYPE_SINT64: "int",
}
_TIMEOUT = "float | datetime.timedelta | None = ..."
_UNARY_OPTIONS = f"timeout: {_TIMEOUT}, retry: Retry | None = ..., metadata: Metadata = ..."
_STREAM_OPTIONS = f"timeout: {_TIMEOUT}, metadata: Metadata = ..."


class _Writer:
    """Collects the imports, field dicts and classes of the stub."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.imports: set[str] = set()
        self.fields: dict[str, list[str]] = {}
        self.lines: list[str] = []

    def module(self, file: descriptor.FileDescriptor) -> str:
        name = file.name.removesuffix(".proto").replace("/", ".").replace("-", "_") + "_pb2"
        self.modules.add(name)
        return name

    def qualified(self, desc: Any) -> str:
        """``module.Outer.Inner`` for a message or enum descriptor."""
        local = (
            desc.full_name.removeprefix(desc.file.package + ".")
            if desc.file.package
            else desc.full_name
        )
        return f"{self.module(desc.file)}.{local}"

    def value_type(self, field: descriptor.FieldDescriptor) -> str:
        if field.message_type is not None:
            return self.qualified(field.message_type)
        if field.enum_type is not None:
            return self.qualified(field.enum_type) + ".ValueType"
        return _SCALARS[field.type]

    def field_type(self, field: descriptor.FieldDescriptor) -> str:
        # The types mypy-protobuf gives the message constructor's arguments.
        msg = field.message_type
        if msg is not None and msg.GetOptions().map_entry:
            key, value = msg.fields_by_name["key"], msg.fields_by_name["value"]
            return f"Mapping[{self.value_type(key)}, {self.value_type(value)}] | None"
        if field.is_repeated:
            return f"Iterable[{self.value_type(field)}] | None"
        optional = field.has_presence and (
            msg is not None
            or (field.containing_oneof is not None and field.containing_oneof.name.startswith("_"))
        )
        return self.value_type(field) + (" | None" if optional else "")

    def request_fields(self, request: Any) -> str:
        """The TypedDict of ``request``'s fields, named after the message."""
        name = "_" + str(request.full_name).replace(".", "_")
        if name not in self.fields:
            self.fields[name] = [
                f"    {f.name}: {self.field_type(f)}"
                for f in request.fields
                if f.name not in OPTIONS and not keyword.iskeyword(f.name)
            ]
        return name


def _comments(service: descriptor.ServiceDescriptor) -> dict[str, str]:
    """The proto comment of each RPC, from mypy-protobuf's ``_pb2_grpc.pyi`` stub."""
    module = importlib.import_module(_grpc_module(service.file))
    path = Path(module.__file__ or "").with_suffix(".pyi")
    if not path.exists():
        return {}
    tree = ast.parse(path.read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == f"{service.name}Stub":
            body = node.body
            for stmt, nxt in itertools.pairwise(body):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    out[stmt.target.id] = " ".join(nxt.value.value.split())
    return out


def _grpc_module(file: descriptor.FileDescriptor) -> str:
    return file.name.removesuffix(".proto").replace("/", ".") + "_pb2_grpc"


def _doc(info: MethodInfo, comment: str) -> str:
    contract = "public" if info.public else f"needs `{info.permission}`"
    if info.client_streaming or info.server_streaming:
        contract += "; streaming, never retried"
    else:
        contract += "; idempotent, retried" if info.idempotent else "; not retried"
    text = f"{comment} ({contract})" if comment else contract.capitalize()
    return '"""' + text.replace("\\", "\\\\").replace('"""', "'''") + '"""'


def _method_class(w: _Writer, info: MethodInfo, name: str, asynchronous: bool, doc: str) -> None:
    req = w.qualified(info.request_type.DESCRIPTOR)
    resp = w.qualified(info.response_type.DESCRIPTOR)
    fields = w.request_fields(info.request_type.DESCRIPTOR)
    adef = "async def" if asynchronous else "def"
    lines = ["@type_check_only", f"class {name}:", f"    {doc}"]
    if info.client_streaming:
        requests = f"Iterable[{req}] | AsyncIterable[{req}]" if asynchronous else f"Iterable[{req}]"
        # An async bidirectional call may be opened without requests, then written to.
        default = " | None = None" if asynchronous and info.server_streaming else ""
        params = f"requests: {requests}{default}, /, *, {_STREAM_OPTIONS}"
    else:
        options = _STREAM_OPTIONS if info.server_streaming else _UNARY_OPTIONS
        params = f"request: {req} | None = None, /, *, {options}, **fields: Unpack[{fields}]"
    if info.server_streaming:
        stream = "AsyncStream" if asynchronous else "Stream"
        lines.append(f"    def __call__(self, {params}) -> {stream}[{resp}]: ...")
    else:
        for fn, out in (("__call__", resp), ("with_call", f"tuple[{resp}, CallInfo]")):
            lines.append(f"    {adef} {fn}(self, {params}) -> {out}: ...")
    w.lines += [*lines, "", ""]


def render() -> str:
    """The stub's text, before formatting."""
    w = _Writer()
    services = catalog.all_services()
    names = [catalog.class_name(s, a) for _, s in services for a in (False, True)]
    if len(set(names)) != len(names):
        raise SystemExit(f"two services would share a client class name: {sorted(names)}")
    for _, svc in services:
        comments = _comments(svc)
        for asynchronous in (False, True):
            cls = catalog.class_name(svc, asynchronous)
            base = "AsyncServiceClient" if asynchronous else "ServiceClient"
            helper_module = HELPERS.get(svc.full_name)
            if helper_module is not None:
                module, sync, asyn = helper_module
                mixin = asyn if asynchronous else sync
                w.imports.add(f"from {module} import {mixin}")
                base += f", {mixin}"
            members: list[str] = []
            for method in svc.methods:
                info = method_info(f"/{svc.full_name}/{method.name}")
                assert info is not None
                helper = f"_{cls}_{method.name}"
                _method_class(
                    w, info, helper, asynchronous, _doc(info, comments.get(method.name, ""))
                )
                members.append(f"    {catalog.snake(method.name)}: {helper}")
            w.lines += [
                f"class {cls}({base}):",
                f'    """The RPCs of `{svc.full_name}`."""',
                *members,
                "",
                "",
            ]
    for asynchronous in (False, True):
        kind = "AsyncServices" if asynchronous else "Services"
        w.lines.append(f"class {kind}(_subclients.{kind}):")
        w.lines.append('    """The sub-client of each service, by attribute."""')
        for attr, svc in services:
            w.lines += [
                "    @property",
                f"    def {attr}(self) -> {catalog.class_name(svc, asynchronous)}:",
                f'        """`{svc.full_name}`."""',
            ]
        w.lines += ["", ""]
    head = [
        '"""The static types of the SDK\'s sub-clients.',
        "",
        "@generated by `python -m autoecoops.sdk._stubgen` from the service descriptors;",
        "do not edit. A new RPC works without it; this file gives it its types.",
        '"""',
        "",
        "# `timeout` is the gRPC deadline the server receives, not an asyncio.timeout.",
        "# ruff: noqa: ASYNC109",
        "",
        "import datetime",
        # Mapping only when a request has a map field, so the file stays lint-clean.
        "from collections.abc import AsyncIterable, Iterable"
        + (", Mapping" if any("Mapping[" in line for b in w.fields.values() for line in b) else ""),
        "from typing import TypedDict, Unpack, type_check_only",
        "",
        *(f"import {m}" for m in sorted(w.modules)),
        "from autoecoops.sdk import subclients as _subclients",
        "from autoecoops.sdk.calls import AsyncStream, CallInfo, Metadata, Stream",
        "from autoecoops.sdk.retry import Retry",
        "from autoecoops.sdk.subclients import AsyncServiceClient as AsyncServiceClient",
        "from autoecoops.sdk.subclients import ServiceClient as ServiceClient",
        *sorted(w.imports),
        "",
    ]
    dicts: list[str] = []
    for name, body in sorted(w.fields.items()):
        dicts += [f"class {name}(TypedDict, total=False):", *(body or ["    pass"]), "", ""]
    return "\n".join([*head, "", *dicts, *w.lines]).rstrip() + "\n"


def formatted(text: str) -> str:
    """``text`` as ruff (the project's formatter and import sorter) leaves it."""
    root = OUT.parent.parent
    run = [sys.executable, "-m", "ruff"]
    name = ["--stdin-filename", str(OUT)]
    fixed = subprocess.run(
        [*run, "check", "--select", "I", "--fix-only", "--quiet", *name, "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    ).stdout
    return subprocess.run(
        [*run, "format", "--quiet", *name, "-"],
        input=fixed or text,
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    ).stdout


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, verify) ``services.pyi``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stub is stale")
    args = parser.parse_args(argv)
    text = formatted(render())
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m autoecoops.sdk._stubgen", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
