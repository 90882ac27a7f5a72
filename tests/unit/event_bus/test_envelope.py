"""Envelope validation: what a producer gets told, field by field."""

from __future__ import annotations

import pytest

from autoecoops.events.v1 import envelope_pb2
from autoecoops.infra.v1 import events_pb2 as infra
from autoecoops.kernel.event_bus.envelope import (
    EnvelopeValidator,
    PublishContext,
    default_registry,
)
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from autoecoops.memory.v1 import events_pb2 as memory

TRACE = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
CTX = PublishContext(
    principal=Principal("alice", issuer="https://issuer"), trace_parent=TRACE, now=1_700_000_000.0
)
V = EnvelopeValidator(default_registry(), max_event_bytes=4096)


def envelope(**over: object) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        source="//autoecoops/kernel/infra-manager",
        type="autoecoops.infra.sync.started",
        idempotency_key="sync-1",
    )
    env.data.Pack(infra.SyncStarted(application="web", operation_id="op-1"))
    for k, v in over.items():
        if k == "data":
            env.data.CopyFrom(v)  # type: ignore[arg-type]
        else:
            setattr(env, k, v)
    return env


def violations(err: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in err.value.field_violations}


def test_registry_knows_every_event_type_and_topic() -> None:
    reg = default_registry()
    assert reg.by_type["autoecoops.infra.sync.started"].topic == "infra.sync"
    assert "memory.documents" in reg.topics
    assert {t.type for t in reg.types_of("infra.sync")} >= {
        "autoecoops.infra.sync.started",
        "autoecoops.infra.sync.failed",
    }


def test_a_valid_envelope_is_completed_from_the_call() -> None:
    env = envelope()
    event = V.validate("infra.sync", env, CTX)
    stored = envelope_pb2.Envelope.FromString(event.data)
    assert stored.spec_version == "1.0"
    assert stored.data_content_type == "application/protobuf"
    assert stored.time.seconds == 1_700_000_000
    assert stored.trace_parent == TRACE
    assert (stored.actor.subject, stored.actor.issuer) == ("alice", "https://issuer")
    assert stored.id == ""
    assert event.actor == "alice"


def test_same_payload_same_content_hash_other_payload_not() -> None:
    a = V.validate("infra.sync", envelope(), CTX)
    b = V.validate("infra.sync", envelope(subject="other"), CTX)
    other = envelope()
    other.data.Pack(infra.SyncStarted(application="api"))
    c = V.validate("infra.sync", other, CTX)
    assert a.key_hash == b.key_hash == c.key_hash
    assert a.content_hash == b.content_hash != c.content_hash


def test_unknown_topic_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        default_registry().check_topic("no.such.topic")
    assert err.value.reason == "UNKNOWN_TOPIC"


def test_unknown_type_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", envelope(type="autoecoops.nope.happened"), CTX)
    assert err.value.reason == "UNKNOWN_EVENT_TYPE"
    assert "envelope.type" in violations(err)


def test_type_on_the_wrong_topic_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        V.validate("memory.documents", envelope(), CTX)
    assert "published on topic 'infra.sync'" in violations(err)["envelope.type"]


def test_payload_of_another_type_is_invalid() -> None:
    env = envelope()
    env.data.Pack(memory.DocumentDeleted(document_id="d"))
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", env, CTX)
    assert "envelope.data" in violations(err)


def test_payload_that_does_not_parse_is_invalid() -> None:
    env = envelope()
    env.data.value = b"\xff\xff\xff garbage"
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", env, CTX)
    assert err.value.reason == "INVALID_PAYLOAD"
    assert "does not parse" in violations(err)["envelope.data"]


def test_missing_idempotency_key_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", envelope(idempotency_key=""), CTX)
    assert "envelope.idempotency_key" in violations(err)


def test_producer_supplied_id_and_bad_trace_are_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", envelope(id="mine", trace_parent="00-zz-yy-01"), CTX)
    assert {"envelope.id", "envelope.trace_parent"} <= violations(err).keys()


def test_no_trace_and_no_actor_anywhere_is_invalid() -> None:
    bare = PublishContext(now=1.0)
    with pytest.raises(InvalidArgument) as err:
        V.validate("infra.sync", envelope(), bare)
    assert {"envelope.trace_parent", "envelope.actor.subject"} <= violations(err).keys()


def test_an_actor_other_than_the_caller_is_denied() -> None:
    env = envelope()
    env.actor.subject = "mallory"
    with pytest.raises(PermissionDenied) as err:
        V.validate("infra.sync", env, CTX)
    assert err.value.reason == "ACTOR_MISMATCH"


def test_oversized_event_is_resource_exhausted() -> None:
    env = envelope()
    env.data.Pack(infra.SyncStarted(application="x" * 5000))
    with pytest.raises(ResourceExhausted) as err:
        V.validate("infra.sync", env, CTX)
    assert err.value.reason == "EVENT_TOO_LARGE"


def test_a_batch_names_every_bad_envelope_by_index() -> None:
    good, bad = envelope(), envelope(idempotency_key="", type="x.y")
    with pytest.raises(InvalidArgument) as err:
        V.validate_batch("infra.sync", [good, bad, envelope(source="")], CTX)
    fields = violations(err).keys()
    assert {"envelopes[1].idempotency_key", "envelopes[1].type", "envelopes[2].source"} <= fields
    assert not any(f.startswith("envelopes[0]") for f in fields)
