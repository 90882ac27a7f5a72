"""RFC 8785 canonical JSON, entry bytes, and C2SP signed notes with Go's reference vector."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from autoecoops.audit.v1 import audit_pb2
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.canonical import canonical_json, entry_bytes, parse_entry
from autoecoops.kernel.policy_audit.checkpoint import (
    CheckpointBody,
    NoteError,
    NoteSigner,
    NoteVerifier,
    load_or_create_signer,
)

# golang.org/x/mod/sumdb/note's example key and note.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        # RFC 8785 appendix B (ES6 number serialization) and section 3.2.3 examples.
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (123.456, "123.456"),
        (-0.0, "0"),
        (2.0**60, "1152921504606847000"),
        (333333333.3333333, "333333333.3333333"),
        (9007199254740991, "9007199254740991"),
        (5e-324, "5e-324"),
        ({"b": [True, None], "a": "\u2028\n\x01"}, '{"a":"\u2028\\n\\u0001","b":[true,null]}'),
        (
            {"\u20ac": 1, "\U0001f600": 2, "\ufb01": 3, "\r": 4},
            '{"\\r":4,"\u20ac":1,"\U0001f600":2,"\ufb01":3}',
        ),
    ],
)
def test_canonical_json_follows_rfc8785(value: object, text: str) -> None:
    assert canonical_json(value) == text.encode()


def test_values_json_cannot_carry_are_refused() -> None:
    for bad in (float("nan"), float("inf"), {1: 2}, b"bytes"):
        with pytest.raises(ValueError):
            canonical_json(bad)


def test_entry_bytes_round_trip_exactly() -> None:
    entry = audit_pb2.AuditEntry(
        index=7, type="t", service="s", action="a", outcome=audit_pb2.OUTCOME_DENIED
    )
    entry.time.FromJsonString("2025-01-02T03:04:05.123456Z")
    entry.details.update({"n": 3, "x": [1.5, "é"], "nested": {"z": None, "a": True}})
    data = entry_bytes(entry)
    assert data.startswith(b'{"action":"a","details":{"n":3,"nested":{"a":true,"z":null}')
    assert b'"index":"7"' in data and b'"outcome":"OUTCOME_DENIED"' in data
    assert entry_bytes(parse_entry(data)) == data


def test_go_note_vector_is_reproduced_byte_for_byte() -> None:
    signer = NoteSigner.from_skey(GO_SKEY)
    assert signer.verifier.vkey() == GO_VKEY
    assert signer.skey() == GO_SKEY
    assert signer.sign(GO_TEXT) == GO_NOTE
    assert NoteVerifier.from_vkey(GO_VKEY).open(GO_NOTE) == GO_TEXT


def test_a_wrong_key_or_a_changed_note_fails() -> None:
    verifier = NoteVerifier.from_vkey(GO_VKEY)
    with pytest.raises(NoteError, match="does not verify"):
        verifier.open(GO_NOTE.replace("cryptography", "cryptographY"))
    other = NoteSigner.generate("PeterNeumann")  # same name, different key
    with pytest.raises(NoteError, match="no signature"):
        other.verifier.open(GO_NOTE)
    with pytest.raises(NoteError):
        NoteVerifier.from_vkey(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_checkpoint_body_is_the_c2sp_format() -> None:
    body = CheckpointBody("example.com/log", 8, bytes.fromhex("5dc9da79" + "00" * 28))
    text = body.text()
    assert text.splitlines()[:2] == ["example.com/log", "8"]
    assert CheckpointBody.parse(text) == body
    signer = NoteSigner.generate("example.com/log")
    assert CheckpointBody.parse(signer.verifier.open(signer.sign(text))) == body
    for bad in ("example.com/log\n08\nAA==\n", "x\n1\n", "x\n1\nnot base64!\n"):
        with pytest.raises(NoteError):
            CheckpointBody.parse(bad)


def test_signing_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "checkpoint.key"
    signer, created = load_or_create_signer(path, "autoecoops.audit/v1", create=True)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created = load_or_create_signer(path, "autoecoops.audit/v1", create=True)
    assert not created and again.verifier.vkey() == signer.verifier.vkey()
    assert path.with_name("checkpoint.key.pub").read_text().strip() == signer.verifier.vkey()
    with pytest.raises(NoteError):
        load_or_create_signer(tmp_path / "absent.key", "x", create=False)


def test_replicas_creating_the_signing_key_at_once_all_load_one_key(tmp_path: Path) -> None:
    # Two policy-audit replicas on one data directory start together: both see no
    # key, both generate one; the one that links second loads the first's.
    path = tmp_path / "checkpoint.key"
    seen = {"exists": 0}
    real_exists = Path.exists

    def racing_exists(self: Path) -> bool:
        if self == path and seen["exists"] == 0:
            seen["exists"] += 1
            load_or_create_signer(path, "autoecoops.audit/v1", create=True)  # the other replica
            return False  # this one looked before the other's key appeared
        return real_exists(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "exists", racing_exists)
        late, created = load_or_create_signer(path, "autoecoops.audit/v1", create=True)
    assert not created
    assert late.verifier.vkey() == NoteSigner.from_skey(path.read_text()).verifier.vkey()
    assert path.with_name("checkpoint.key.pub").read_text().strip() == late.verifier.vkey()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.key", "checkpoint.key.pub"]


def test_leaf_hash_is_over_the_exact_bytes() -> None:
    assert merkle.leaf_hash(b"") == bytes.fromhex(
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


def test_the_index_splice_equals_full_canonicalization() -> None:
    from autoecoops.kernel.policy_audit.canonical import entry_json, with_index

    for details in ({}, {"outcome": "nested", "z": {"outcome": 1}}, {"s": 'quote " "outcome":'}):
        entry = audit_pb2.AuditEntry(
            type="t", service="s", action="a", outcome=audit_pb2.OUTCOME_SUCCESS, resource="r"
        )
        entry.details.update(details)
        plain = entry_bytes(entry)
        for index in (0, 1, 12345):
            doc = entry_json(entry)
            if index:
                doc["index"] = str(index)
            assert with_index(plain, index) == canonical_json(doc)


def test_plain_documents_take_the_fast_path_with_the_same_bytes() -> None:
    from autoecoops.kernel.policy_audit.canonical import _emit

    doc = {"b": [1, "x\u2028", None, {"\u00e9": True}], "a": -(2**52)}
    slow: list[str] = []
    _emit(doc, slow)
    assert canonical_json(doc) == "".join(slow).encode()


def test_entry_json_is_message_to_dict_field_for_field() -> None:
    from google.protobuf import json_format

    from autoecoops.kernel.policy_audit.canonical import entry_json

    full = audit_pb2.AuditEntry(
        index=7,
        type="rpc",
        service="event-bus",
        action="autoecoops.events.v1.EventBusService.Publish",
        resource="topic/infra.sync",
        outcome=audit_pb2.OUTCOME_DENIED,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        decision_id="d-1",
    )
    full.time.FromNanoseconds(1_700_000_000_123_456_000)
    full.actor.subject, full.actor.issuer = "alice", "https://issuer"
    full.actor.actors.extend(["system:iaops", "system:gw"])
    full.details.update({"n": 3, "f": 1.5, "s": "x", "l": [1, "a", None], "o": {"b": True}})
    empty_actor = audit_pb2.AuditEntry(type="t", service="s", action="a", outcome=1)
    empty_actor.actor.SetInParent()
    odd = audit_pb2.AuditEntry(type="t", service="s", action="a")
    odd.outcome = 9  # type: ignore[assignment]
    for e in (full, empty_actor, odd, audit_pb2.AuditEntry()):
        assert entry_json(e) == json_format.MessageToDict(e)
