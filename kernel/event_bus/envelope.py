"""The event types the bus knows, and the validation of a published envelope.

Event types come from the contracts: every message carrying the
``(autoecoops.common.v1.event)`` option is one, and names its topic. There is
no second table: a topic exists because some event type names it.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib
import pkgutil
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import descriptor, message, message_factory
from opentelemetry.propagators.textmap import default_setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import autoecoops
from autoecoops.common.v1 import options_pb2
from autoecoops.events.v1 import envelope_pb2
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)

SPEC_VERSION = "1.0"
PROTOBUF = "application/protobuf"
TYPE_URL_PREFIX = "type.googleapis.com/"
MAX_IDEMPOTENCY_KEY = 256
MAX_TRACE_STATE = 512
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
#: Records a violation: (field under the envelope, what is wrong).
_Fail = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class EventType:
    """One event type of the contracts."""

    #: The CloudEvents type, e.g. ``autoecoops.infra.sync.started``.
    type: str
    #: The topic it is published on.
    topic: str
    #: The one-line summary of its option.
    summary: str
    #: The payload message.
    descriptor: descriptor.Descriptor

    @property
    def message_class(self) -> builtins.type[message.Message]:
        """The generated class of the payload."""
        return message_factory.GetMessageClass(self.descriptor)

    @property
    def type_url(self) -> str:
        """The ``google.protobuf.Any`` type URL of the payload."""
        return TYPE_URL_PREFIX + self.descriptor.full_name


class Registry:
    """The event types and topics of the contracts, by type and by topic."""

    def __init__(self, types: Iterable[EventType]) -> None:
        self.by_type: dict[str, EventType] = {}
        self.by_message: dict[str, EventType] = {}
        for t in types:
            self.by_type[t.type] = t
            self.by_message[t.descriptor.full_name] = t
        self.topics: tuple[str, ...] = tuple(sorted({t.topic for t in self.by_type.values()}))

    def types_of(self, topic: str) -> list[EventType]:
        """The event types published on ``topic``."""
        return [t for t in self.by_type.values() if t.topic == topic]

    def check_topic(self, topic: str, field: str = "topic") -> str:
        """Return ``topic`` if some event type names it, else raise InvalidArgument."""
        if topic in self.topics:
            return topic
        raise InvalidArgument(
            f"{field}: unknown topic {topic!r}; topics are named by the event types of the "
            "contracts (see gen/asyncapi/asyncapi.yaml)",
            reason="UNKNOWN_TOPIC",
            metadata={"topic": topic[:200]},
            field_violations=[FieldViolation(field, "unknown topic")],
        )


def event_spec(desc: descriptor.Descriptor) -> options_pb2.EventSpec | None:
    """The event option of a message, or None when it is not an event payload."""
    opts = desc.GetOptions()
    if not opts.HasExtension(options_pb2.event):
        return None
    spec: options_pb2.EventSpec = opts.Extensions[options_pb2.event]
    return spec


def contract_files() -> list[descriptor.FileDescriptor]:
    """Every generated proto file of the contracts (importing them registers their types)."""
    files: list[descriptor.FileDescriptor] = []
    for domain in pkgutil.iter_modules(autoecoops.__path__):
        if not domain.ispkg:
            continue
        try:
            versions = importlib.import_module(f"autoecoops.{domain.name}.v1")
        except ImportError:
            continue
        for mod in pkgutil.iter_modules(versions.__path__):
            if mod.name.endswith("_pb2"):
                module = importlib.import_module(f"{versions.__name__}.{mod.name}")
                files.append(module.DESCRIPTOR)
    return files


@functools.cache
def default_registry() -> Registry:
    """The registry of every event type in the generated contracts."""
    types: list[EventType] = []
    for file in contract_files():
        for desc in file.message_types_by_name.values():
            spec = event_spec(desc)
            if spec is not None:
                types.append(EventType(spec.type, spec.topic, spec.summary, desc))
    return Registry(types)


@dataclass(frozen=True, slots=True)
class PublishContext:
    """What the publish call knows about its caller, to complete envelopes."""

    #: The verified caller, when the call was authenticated.
    principal: Principal | None = None
    #: The W3C traceparent/tracestate of the publish call.
    trace_parent: str = ""
    trace_state: str = ""
    #: The publish time, seconds since the epoch.
    now: float = 0.0

    @property
    def now_parts(self) -> tuple[int, int]:
        """The publish time as Timestamp (seconds, nanos)."""
        ns = int(self.now * 1e9)
        return ns // 1_000_000_000, ns % 1_000_000_000

    @classmethod
    def current(cls, principal: Principal | None) -> PublishContext:
        """The context of the call being served (its trace and the time)."""
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, setter=default_setter)
        return cls(
            principal=principal,
            trace_parent=carrier.get("traceparent", ""),
            trace_state=carrier.get("tracestate", ""),
            now=time.time(),
        )


@dataclass(frozen=True, slots=True)
class ValidEvent:
    """An envelope that passed validation, ready to store."""

    #: The event type.
    type: str
    #: The serialized envelope, its id left empty: the bus's id is the stream id.
    data: bytes
    #: A digest of the idempotency key, the key of the dedup records.
    key_hash: str
    #: A digest of type + payload, to tell a true duplicate from a reused key.
    content_hash: str
    #: The traceparent and actor subject, kept beside the envelope for audit.
    trace_parent: str
    actor: str
    #: The ordering key (see ``ordering_key``): picks the partition.
    ordering_key: str = ""


def ordering_key(env: envelope_pb2.Envelope) -> str:
    """The key that picks an event's partition: ``partition_key``, else the
    subject, else the resource, else the idempotency key.

    Never the bus-assigned id: a retried publish must land on the partition
    that remembers its idempotency key, or it would be stored twice.
    """
    return env.partition_key or env.subject or env.resource or env.idempotency_key


def key_digest(idempotency_key: str) -> str:
    """The digest a dedup record is keyed by (fixed length, no user bytes in key names)."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


class EnvelopeValidator:
    """Checks envelopes against the registry and completes them for storage."""

    def __init__(self, registry: Registry, max_event_bytes: int) -> None:
        self.registry = registry
        self.max_event_bytes = max_event_bytes

    def validate(
        self, topic: str, env: envelope_pb2.Envelope, ctx: PublishContext, field: str = "envelope"
    ) -> ValidEvent:
        """Validate and complete one envelope; raise with every violation found."""
        bad: list[FieldViolation] = []
        event = self._check(topic, env, ctx, field, bad)
        if bad or event is None:
            raise _invalid(bad)
        return event

    def validate_batch(
        self, topic: str, envs: Sequence[envelope_pb2.Envelope], ctx: PublishContext
    ) -> list[ValidEvent]:
        """Validate a batch: all pass, or nothing is stored and every violation is named."""
        bad: list[FieldViolation] = []
        out: list[ValidEvent] = []
        for i, env in enumerate(envs):
            event = self._check(topic, env, ctx, f"envelopes[{i}]", bad)
            if event is not None:
                out.append(event)
        if bad:
            raise _invalid(bad)
        return out

    def _check(
        self,
        topic: str,
        env: envelope_pb2.Envelope,
        ctx: PublishContext,
        field: str,
        bad: list[FieldViolation],
    ) -> ValidEvent | None:
        start = len(bad)

        def fail(name: str, why: str) -> None:
            bad.append(FieldViolation(f"{field}.{name}", why))

        if env.id:
            fail("id", "is assigned by the bus; leave it empty (Publish returns it)")
        if not env.source:
            fail("source", "required field is missing")
        if env.spec_version not in ("", SPEC_VERSION):
            fail("spec_version", f"must be {SPEC_VERSION!r} or empty")
        if env.data_content_type not in ("", PROTOBUF):
            fail("data_content_type", f"must be {PROTOBUF!r} or empty")
        if not env.idempotency_key:
            fail("idempotency_key", "required field is missing")
        elif len(env.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            fail("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY} characters")
        if len(env.partition_key) > MAX_IDEMPOTENCY_KEY:
            fail("partition_key", f"longer than {MAX_IDEMPOTENCY_KEY} characters")
        self._check_type_and_data(topic, env, fail)
        self._complete_trace(env, ctx, fail)
        self._complete_actor(env, ctx, field)
        if not env.actor.subject:
            fail("actor.subject", "required: the envelope names no actor and the call has none")
        if len(bad) > start:
            return None
        if not env.spec_version:
            env.spec_version = SPEC_VERSION
        if not env.data_content_type:
            env.data_content_type = PROTOBUF
        if not env.HasField("time"):
            env.time.seconds, env.time.nanos = ctx.now_parts
        data = env.SerializeToString()
        if len(data) > self.max_event_bytes:
            raise ResourceExhausted(
                f"{field}: the event is {len(data)} bytes; the limit is {self.max_event_bytes}",
                reason="EVENT_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_event_bytes), "size_bytes": str(len(data))},
                field_violations=[FieldViolation(field, "event too large")],
            )
        content = hashlib.sha256(env.type.encode() + b"\0" + env.data.value).hexdigest()[:32]
        return ValidEvent(
            type=env.type,
            data=data,
            key_hash=key_digest(env.idempotency_key),
            content_hash=content,
            trace_parent=env.trace_parent,
            actor=env.actor.subject,
            ordering_key=ordering_key(env),
        )

    def _check_type_and_data(self, topic: str, env: envelope_pb2.Envelope, fail: _Fail) -> None:
        if not env.type:
            fail("type", "required field is missing")
            return
        event_type = self.registry.by_type.get(env.type)
        if event_type is None:
            fail("type", f"unknown event type {env.type[:200]!r}")
            return
        if event_type.topic != topic:
            fail("type", f"{env.type} is published on topic {event_type.topic!r}, not {topic!r}")
        if not env.HasField("data"):
            fail("data", "required field is missing")
            return
        if env.data.type_url != event_type.type_url:
            fail(
                "data", f"holds {env.data.type_url[:200]!r}; {env.type} needs {event_type.type_url}"
            )
            return
        try:
            event_type.message_class().ParseFromString(env.data.value)
        except message.DecodeError:
            fail("data", f"does not parse as {event_type.descriptor.full_name}")

    @staticmethod
    def _complete_trace(env: envelope_pb2.Envelope, ctx: PublishContext, fail: _Fail) -> None:
        if not env.trace_parent:
            # The publish call's own trace: the consumer continues the producer's trace.
            env.trace_parent, env.trace_state = ctx.trace_parent, ctx.trace_state
        if not env.trace_parent:
            fail("trace_parent", "required: no trace context in the envelope or the call")
            return
        if not _valid_traceparent(env.trace_parent):
            fail("trace_parent", "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
        if len(env.trace_state) > MAX_TRACE_STATE:
            fail("trace_state", f"longer than {MAX_TRACE_STATE} characters")

    @staticmethod
    def _complete_actor(env: envelope_pb2.Envelope, ctx: PublishContext, field: str) -> None:
        p = ctx.principal
        if p is None:
            return
        if not env.actor.subject:
            env.actor.subject, env.actor.issuer = p.subject, p.issuer
            env.actor.actors[:] = list(p.actors)
            return
        # A caller may not attribute its event to someone else.
        if env.actor.subject != p.subject or (env.actor.issuer and env.actor.issuer != p.issuer):
            raise PermissionDenied(
                f"{field}.actor names {env.actor.subject!r} but the caller is {p.subject!r}",
                reason="ACTOR_MISMATCH",
                field_violations=[FieldViolation(f"{field}.actor", "is not the caller")],
            )
        if not env.actor.issuer:
            env.actor.issuer = p.issuer


@functools.lru_cache(maxsize=1024)
def _valid_traceparent(value: str) -> bool:
    # Cached: the events of a batch usually share their producer's traceparent.
    m = _TRACEPARENT.fullmatch(value)
    return m is not None and set(m[1]) != {"0"} and set(m[2]) != {"0"}


def _invalid(bad: list[FieldViolation]) -> InvalidArgument:
    reason = "INVALID_ENVELOPE"
    for v in bad:
        if v.description.startswith("unknown event type"):
            reason = "UNKNOWN_EVENT_TYPE"
            break
        if v.description.startswith("does not parse"):
            reason = "INVALID_PAYLOAD"
    return InvalidArgument(
        "invalid event: " + "; ".join(f"{v.field}: {v.description}" for v in bad[:10]),
        reason=reason,
        field_violations=bad,
    )
