"""The proto3 JSON mapping, both ways, with field paths in every error.

Requests are decoded here rather than by ``json_format.Parse`` because a REST
client needs to know *which* field is wrong: every problem becomes a
``FieldViolation`` with the proto path (``role.permissions[2]``), all of them
are collected, and the backend is only called when there are none. Input
accepts a field's JSON name and its proto name; unknown fields are errors.
Well-known types (Timestamp, Duration, FieldMask, Struct, Any, wrappers...)
are leaves handed to ``json_format``, which knows their string forms.

Responses use ``json_format``: camelCase names, and every field without
presence is emitted even when it has its default value.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from google.protobuf import descriptor, descriptor_pool, json_format
from google.protobuf.message import Message

from autoecoops.kernel.mesh.errors import FieldViolation

FD = descriptor.FieldDescriptor

WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
#: Message types whose JSON form is not an object of their fields.
WELL_KNOWN = WRAPPERS | {
    f"google.protobuf.{n}"
    for n in ("Any", "Timestamp", "Duration", "FieldMask", "Struct", "Value", "ListValue", "Empty")
}
#: Well-known types a query parameter or path value can carry (they have a string form).
STRING_FORM = WRAPPERS | {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
}

_INT_RANGE = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TYPE_NAMES = {
    FD.TYPE_DOUBLE: "double",
    FD.TYPE_FLOAT: "float",
    FD.TYPE_INT64: "int64",
    FD.TYPE_UINT64: "uint64",
    FD.TYPE_INT32: "int32",
    FD.TYPE_FIXED64: "fixed64",
    FD.TYPE_FIXED32: "fixed32",
    FD.TYPE_BOOL: "bool",
    FD.TYPE_STRING: "string",
    FD.TYPE_BYTES: "bytes",
    FD.TYPE_UINT32: "uint32",
    FD.TYPE_SFIXED32: "sfixed32",
    FD.TYPE_SFIXED64: "sfixed64",
    FD.TYPE_SINT32: "sint32",
    FD.TYPE_SINT64: "sint64",
}
_FLOAT_MAX = 3.4028234663852886e38
_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/\-_]*={0,2}$")
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_TRUE, _FALSE = {"true", "t", "1"}, {"false", "f", "0"}


class _Bad:
    """Marks a value that produced a violation."""


BAD = _Bad()


class BodyError(ValueError):
    """A request body that is not JSON at all (syntax, encoding, duplicate keys)."""


def message_of(field: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    """The message type of a message field."""
    desc = field.message_type
    if desc is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return desc


def enum_of(field: descriptor.FieldDescriptor) -> descriptor.EnumDescriptor:
    """The enum type of an enum field."""
    desc = field.enum_type
    if desc is None:
        raise TypeError(f"{field.full_name} is not an enum field")
    return desc


def is_map(field: descriptor.FieldDescriptor) -> bool:
    """True for a ``map<K, V>`` field."""
    return (
        field.type == FD.TYPE_MESSAGE
        and field.is_repeated
        and message_of(field).GetOptions().map_entry
    )


@cache
def field_lookup(desc: descriptor.Descriptor) -> dict[str, descriptor.FieldDescriptor]:
    """A message's fields by JSON name and by proto name."""
    out: dict[str, descriptor.FieldDescriptor] = {}
    for f in desc.fields:
        out[f.name] = f
        out[f.json_name] = f
    return out


def type_name(field: descriptor.FieldDescriptor) -> str:
    """The proto type of a field as a reader knows it (``int32``, ``Role``...)."""
    if field.type == FD.TYPE_MESSAGE:
        return str(message_of(field).full_name)
    if field.type == FD.TYPE_ENUM:
        return str(enum_of(field).full_name)
    return _TYPE_NAMES.get(field.type, "value")


def load_json(body: bytes) -> Any:
    """Parse a JSON document strictly: UTF-8, standard JSON, no duplicate keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BodyError(f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise BodyError(
            f"the body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise BodyError("the body is nested too deeply") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"the body is not valid: the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity as bare words; JSON does not.
    raise BodyError(f'the body is not valid JSON: {name} must be quoted ("{name}")')


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Decoder:
    """Fills request messages from JSON values, query parameters and path values."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    # -- JSON ---------------------------------------------------------------

    def merge_message(self, value: Any, msg: Message, path: str, out: list[FieldViolation]) -> None:
        """Merge the JSON ``value`` into ``msg``; append a violation per problem."""
        try:
            self._message(value, msg, path, out)
        except RecursionError:
            out.append(FieldViolation(path, "nested too deeply"))

    def merge_field(
        self,
        field: descriptor.FieldDescriptor,
        value: Any,
        msg: Message,
        path: str,
        out: list[FieldViolation],
    ) -> None:
        """Merge ``value`` into one field of ``msg`` (a body bound to one field)."""
        if value is None and not _null_is_value(field):
            return
        try:
            self._field(field, value, msg, path, out)
        except RecursionError:
            out.append(FieldViolation(path, "nested too deeply"))

    def _message(self, value: Any, msg: Message, path: str, out: list[FieldViolation]) -> None:
        desc = msg.DESCRIPTOR
        if desc.full_name in WELL_KNOWN:
            self._well_known(value, msg, path, out)
            return
        if not isinstance(value, dict):
            out.append(
                FieldViolation(path, f"expected an object ({desc.full_name}), got {_kind(value)}")
            )
            return
        fields = field_lookup(desc)
        used: dict[str, str] = {}
        for key, item in value.items():
            field = fields.get(key)
            if field is None:
                out.append(
                    FieldViolation(_join(path, key), f"unknown field {key!r} in {desc.full_name}")
                )
                continue
            sub = _join(path, field.name)
            if field.name in used:
                out.append(FieldViolation(sub, f"set twice, as {used[field.name]!r} and {key!r}"))
                continue
            used[field.name] = key
            if item is None and not _null_is_value(field):
                continue  # proto3 JSON: null means "not set"
            if _oneof_taken(msg, field, sub, out):
                continue
            self._field(field, item, msg, sub, out)

    def _field(
        self,
        field: descriptor.FieldDescriptor,
        value: Any,
        msg: Message,
        path: str,
        out: list[FieldViolation],
    ) -> None:
        if is_map(field):
            self._map(field, value, msg, path, out)
        elif field.is_repeated:
            if not isinstance(value, list):
                out.append(
                    FieldViolation(
                        path, f"expected an array of {type_name(field)}, got {_kind(value)}"
                    )
                )
                return
            container = getattr(msg, field.name)
            if field.type == FD.TYPE_MESSAGE:
                for i, item in enumerate(value):
                    if item is None and message_of(field).full_name != "google.protobuf.Value":
                        out.append(
                            FieldViolation(f"{path}[{i}]", "null is not allowed in an array")
                        )
                        continue
                    self._message(item, container.add(), f"{path}[{i}]", out)
            else:
                items = [self.scalar(field, v, f"{path}[{i}]", out) for i, v in enumerate(value)]
                container.extend(v for v in items if v is not BAD)
        elif field.type == FD.TYPE_MESSAGE:
            sub = getattr(msg, field.name)
            sub.SetInParent()
            self._message(value, sub, path, out)
        else:
            v = self.scalar(field, value, path, out)
            if v is not BAD:
                setattr(msg, field.name, v)

    def _map(
        self,
        field: descriptor.FieldDescriptor,
        value: Any,
        msg: Message,
        path: str,
        out: list[FieldViolation],
    ) -> None:
        if not isinstance(value, dict):
            out.append(FieldViolation(path, f"expected an object (a map), got {_kind(value)}"))
            return
        entry = message_of(field)
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        container = getattr(msg, field.name)
        for raw_key, item in value.items():
            sub = f"{path}[{raw_key}]"
            key = self.text(key_field, raw_key, sub, out)
            if key is BAD:
                continue
            if item is None and not _null_is_value(value_field):
                out.append(FieldViolation(sub, "null is not a valid map value"))
            elif value_field.type == FD.TYPE_MESSAGE:
                self._message(item, container[key], sub, out)
            else:
                v = self.scalar(value_field, item, sub, out)
                if v is not BAD:
                    container[key] = v

    def _well_known(self, value: Any, msg: Message, path: str, out: list[FieldViolation]) -> None:
        try:
            json_format.ParseDict(value, msg, descriptor_pool=self._pool)
        except (json_format.ParseError, ValueError, TypeError, AttributeError, KeyError) as err:
            what = str(err).rstrip(".") or type(err).__name__
            out.append(FieldViolation(path, f"invalid {msg.DESCRIPTOR.full_name}: {what}"))

    def scalar(
        self, field: descriptor.FieldDescriptor, value: Any, path: str, out: list[FieldViolation]
    ) -> Any:
        """A JSON value converted for a scalar or enum field, or ``BAD`` (with a violation)."""
        t = field.type
        if t in _INT_RANGE:
            return self._integer(field, value, path, out)
        if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return _float(field, value, path, out)
        if t == FD.TYPE_BOOL:
            if isinstance(value, bool):
                return value
        elif t == FD.TYPE_STRING:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    out.append(FieldViolation(path, "not valid UTF-8 (a lone surrogate escape)"))
                    return BAD
                return value
        elif t == FD.TYPE_BYTES:
            if isinstance(value, str):
                return _bytes(value, path, out)
        elif t == FD.TYPE_ENUM:
            return _enum(field, value, path, out)
        out.append(FieldViolation(path, f"expected {type_name(field)}, got {_kind(value)}"))
        return BAD

    @staticmethod
    def _integer(
        field: descriptor.FieldDescriptor, value: Any, path: str, out: list[FieldViolation]
    ) -> Any:
        n: int | None = None
        if isinstance(value, bool):
            n = None
        elif isinstance(value, int):
            n = value
        elif isinstance(value, float) and value.is_integer():
            n = int(value)
        elif isinstance(value, str):
            if _INTEGER.match(value):
                n = int(value)
            elif _NUMBER.match(value) and float(value).is_integer():
                n = int(float(value))
        if n is None:
            out.append(
                FieldViolation(path, f"expected {type_name(field)} (an integer), got {value!r}")
            )
            return BAD
        lo, hi = _INT_RANGE[field.type]
        if not lo <= n <= hi:
            out.append(FieldViolation(path, f"{n} is out of range for {type_name(field)}"))
            return BAD
        return n

    # -- text: query parameters, path values, map keys --------------------

    def text(
        self, field: descriptor.FieldDescriptor, raw: str, path: str, out: list[FieldViolation]
    ) -> Any:
        """A URL string converted for a scalar or enum field, or ``BAD``."""
        if field.type == FD.TYPE_BOOL:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            out.append(FieldViolation(path, f"expected true or false, got {raw!r}"))
            return BAD
        if field.type in _INT_RANGE and not _INTEGER.match(raw):
            out.append(
                FieldViolation(path, f"expected {type_name(field)} (an integer), got {raw!r}")
            )
            return BAD
        return self.scalar(field, raw, path, out)

    def set_text(
        self,
        msg: Message,
        chain: Sequence[descriptor.FieldDescriptor],
        values: Sequence[str],
        path: str,
        out: list[FieldViolation],
    ) -> None:
        """Set the field at the end of ``chain`` from URL strings (a path value or query)."""
        target = msg
        for f in chain[:-1]:
            target = getattr(target, f.name)
        leaf = chain[-1]
        if _oneof_taken(target, leaf, path, out):
            return
        if leaf.type == FD.TYPE_MESSAGE:
            name = message_of(leaf).full_name
            if name not in STRING_FORM:
                out.append(
                    FieldViolation(
                        path, f"{name} cannot be set from a URL; set its fields as {path}.<field>"
                    )
                )
                return
            subs = (
                [getattr(target, leaf.name).add() for _ in values]
                if leaf.is_repeated
                else [getattr(target, leaf.name)]
            )
            for sub, raw in zip(subs, values, strict=True):
                sub.SetInParent()
                if name in WRAPPERS:
                    v = self.text(sub.DESCRIPTOR.fields_by_name["value"], raw, path, out)
                    if v is not BAD:
                        sub.value = v
                else:
                    self._well_known(raw, sub, path, out)
            return
        items = [self.text(leaf, raw, path, out) for raw in values]
        good = [v for v in items if v is not BAD]
        if len(good) != len(items):
            return
        if leaf.is_repeated:
            getattr(target, leaf.name).extend(good)
        else:
            setattr(target, leaf.name, good[0])

    def merge_query(
        self,
        msg: Message,
        pairs: Iterable[tuple[str, str]],
        bound: Sequence[str],
        out: list[FieldViolation],
    ) -> None:
        """Set fields from query parameters; ``bound`` paths (path, body) are left alone.

        ``a.b=1`` sets a nested field; ``p=A&p=B`` fills a repeated one;
        repeating a non-repeated field is an error; parameters naming no field
        are ignored, as grpc-gateway does.
        """
        grouped: dict[str, tuple[list[descriptor.FieldDescriptor], list[str]]] = {}
        for key, raw in pairs:
            chain = self._resolve(_descriptor(msg), key, out)
            if chain is None:
                continue
            proto_path = ".".join(f.name for f in chain)
            if any(_overlaps(proto_path, b) for b in bound):
                continue
            grouped.setdefault(proto_path, (chain, []))[1].append(raw)
        for proto_path, (chain, values) in grouped.items():
            leaf = chain[-1]
            if len(values) > 1 and not leaf.is_repeated:
                out.append(
                    FieldViolation(
                        proto_path,
                        f"{proto_path} is not repeated but was given {len(values)} times",
                    )
                )
                continue
            self.set_text(msg, chain, values, proto_path, out)

    @staticmethod
    def _resolve(
        desc: descriptor.Descriptor, key: str, out: list[FieldViolation]
    ) -> list[descriptor.FieldDescriptor] | None:
        chain: list[descriptor.FieldDescriptor] = []
        names = key.split(".")
        for i, name in enumerate(names):
            field = field_lookup(desc).get(name)
            if field is None:
                return None  # unknown parameter: ignored
            chain.append(field)
            last = i == len(names) - 1
            where = ".".join(f.name for f in chain)
            if is_map(field):
                out.append(FieldViolation(where, "a map cannot be set from query parameters"))
                return None
            if field.type == FD.TYPE_MESSAGE and message_of(field).full_name not in STRING_FORM:
                if message_of(field).full_name in WELL_KNOWN:
                    out.append(
                        FieldViolation(
                            where, f"{message_of(field).full_name} cannot be set from a URL"
                        )
                    )
                    return None
                if field.is_repeated:
                    out.append(
                        FieldViolation(
                            where, "a repeated message cannot be set from query parameters"
                        )
                    )
                    return None
                if last:
                    out.append(
                        FieldViolation(where, f"a message; set its fields as {where}.<field>")
                    )
                    return None
                desc = message_of(field)
            elif field.type == FD.TYPE_MESSAGE and not last:
                # A well-known type with a string form is set whole
                # (startTime=2024-01-01T00:00:00Z); reaching into its fields
                # (startTime.seconds=...) would be silently ignored, so say so.
                out.append(
                    FieldViolation(
                        where,
                        f"{message_of(field).full_name} is set in its string form as "
                        f"{where}=<value>, not by its fields ({key})",
                    )
                )
                return None
            elif not last:
                return None  # a path through a scalar names no field: ignored
        return chain


def _descriptor(msg: Message) -> descriptor.Descriptor:
    # The upb and pure-Python Descriptor classes are one type at run time.
    return msg.DESCRIPTOR  # type: ignore[return-value]


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _oneof_taken(
    msg: Message, field: descriptor.FieldDescriptor, path: str, out: list[FieldViolation]
) -> bool:
    """True (with a violation) when another member of ``field``'s oneof is already set."""
    oneof = field.containing_oneof
    if oneof is None or len(oneof.fields) < 2:  # none, or proto3 `optional`
        return False
    other = msg.WhichOneof(oneof.name)
    if other is None or other == field.name:
        return False
    out.append(FieldViolation(path, f"only one of oneof {oneof.name!r}; {other} is set"))
    return True


def _null_is_value(field: descriptor.FieldDescriptor) -> bool:
    if field.type == FD.TYPE_MESSAGE:
        return bool(message_of(field).full_name == "google.protobuf.Value")
    return field.type == FD.TYPE_ENUM and enum_of(field).full_name == "google.protobuf.NullValue"


def _float(
    field: descriptor.FieldDescriptor, value: Any, path: str, out: list[FieldViolation]
) -> Any:
    v: float | None = None
    if isinstance(value, bool):
        v = None
    elif isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        if value in _SPECIAL_FLOATS:
            v = _SPECIAL_FLOATS[value]
        elif _NUMBER.match(value):
            v = float(value)
    if v is None:
        out.append(FieldViolation(path, f"expected {type_name(field)} (a number), got {value!r}"))
        return BAD
    if field.type == FD.TYPE_FLOAT and math.isfinite(v) and abs(v) > _FLOAT_MAX:
        out.append(FieldViolation(path, f"{value!r} is out of range for float"))
        return BAD
    return v


def _bytes(value: str, path: str, out: list[FieldViolation]) -> Any:
    if _BASE64.match(value):
        std = value.replace("-", "+").replace("_", "/").rstrip("=")
        try:
            return base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass
    out.append(FieldViolation(path, "expected base64 (standard or URL-safe)"))
    return BAD


def _enum(
    field: descriptor.FieldDescriptor, value: Any, path: str, out: list[FieldViolation]
) -> Any:
    enum = enum_of(field)
    if isinstance(value, str):
        known = enum.values_by_name.get(value)
        if known is not None:
            return known.number
        if _INTEGER.match(value):
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if enum.is_closed and value not in enum.values_by_number:
            out.append(FieldViolation(path, f"{value} is not a value of {enum.full_name}"))
            return BAD
        if -(2**31) <= value < 2**31:
            return value
    names = ", ".join(enum.values_by_name)
    out.append(FieldViolation(path, f"{value!r} is not a value of {enum.full_name} ({names})"))
    return BAD


def message_to_json(msg: Message, pool: descriptor_pool.DescriptorPool | None = None) -> Any:
    """A message as its JSON value: camelCase, fields without presence always present."""
    return json_format.MessageToDict(
        msg,
        always_print_fields_with_no_presence=True,
        descriptor_pool=pool,
    )


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON bytes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
