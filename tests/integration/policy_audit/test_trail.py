"""The audit log on a real Redis: group commit, idempotency, proofs, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from autoecoops.audit.v1 import audit_pb2
from autoecoops.kernel.mesh.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
)
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteSigner
from autoecoops.kernel.policy_audit.trail import AuditLog, EntryFilter
from tests.integration.policy_audit.conftest import ORIGIN, entry


async def keys_snapshot(client: aioredis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key of the test with its type and length: 'untouched' means equal snapshots."""
    out: dict[bytes, object] = {}
    async for key in client.scan_iter(match=prefix + "*"):
        kind = (await client.type(key)).decode()
        size = {
            "stream": client.xlen,
            "string": client.strlen,
            "hash": client.hlen,
            "zset": client.zcard,
        }[kind]
        out[key] = (kind, await size(key))
    return out


async def test_concurrent_appends_lose_nothing_and_reorder_nothing(audit: AuditLog) -> None:
    results = await asyncio.gather(*(audit.append(entry(n), f"req-{n}") for n in range(600)))
    assert sorted(r.index for r in results) == list(range(600))
    assert audit.commits < 600  # they were grouped
    # Each entry is where its append said, with the bytes its leaf hash covers.
    stored = await audit.entries([r.index for r in results])
    for r, s in zip(results, stored, strict=True):
        assert s.leaf_hash == r.leaf_hash == merkle.leaf_hash(s.data)
        assert s.entry.index == r.index
    by_n = {int(s.entry.details["n"]): s.entry.index for s in stored}
    assert sorted(by_n) == list(range(600))
    cp = await audit.checkpoint()
    assert cp.body.size == 600
    leaves = [s.leaf_hash for s in sorted(stored, key=lambda s: s.entry.index)]
    assert cp.body.root_hash == merkle.root_of(leaves)


async def test_each_append_is_covered_by_its_checkpoint(
    audit: AuditLog, signer: NoteSigner
) -> None:
    for n in range(5):
        got = await audit.append(entry(n), f"r{n}")
        body = CheckpointBody.parse(signer.verifier.open(got.checkpoint.note))
        assert body.origin == ORIGIN and body.size >= got.index + 1
        size, proof = await audit.inclusion_proof(got.index, body.size)
        assert merkle.verify_inclusion(got.index, size, got.leaf_hash, proof, body.root_hash)


async def test_a_retried_request_returns_the_original_entry(audit: AuditLog) -> None:
    first = await audit.append(entry(1), "same-id")
    await audit.append(entry(2), "other")
    again = await audit.append(entry(1), "same-id")
    assert (again.index, again.leaf_hash, again.replayed) == (first.index, first.leaf_hash, True)
    # Concurrent retries of one request collapse into one entry too.
    both = await asyncio.gather(audit.append(entry(3), "dup"), audit.append(entry(3), "dup"))
    assert both[0].index == both[1].index
    assert await audit.size() == 3


async def test_a_request_id_reused_for_another_entry_is_refused(audit: AuditLog) -> None:
    first = await audit.append(entry(1), "rid")
    with pytest.raises(InvalidArgument) as info:
        await audit.append(entry(2), "rid")
    assert info.value.reason == "REQUEST_ID_REUSED"
    # The refusal names the entry holding the id (the outbox reads it as "recorded").
    assert info.value.metadata["index"] == str(first.index)
    assert await audit.size() == 1


async def test_an_oversized_or_invalid_append_leaves_the_log_untouched(
    audit: AuditLog, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await audit.append(entry(0), "ok")
    before = await keys_snapshot(redis_client, key_prefix)
    big = entry(1)
    big.details.update({"blob": "x" * 5000})
    with pytest.raises(InvalidArgument) as info:
        await audit.append(big, "big")
    assert info.value.reason == "ENTRY_TOO_LARGE"
    assert info.value.field_violations[0].field == "entry"
    with pytest.raises(InvalidArgument) as info:
        await audit.append(audit_pb2.AuditEntry(type="t"), "")
    assert {v.field for v in info.value.field_violations} == {
        "entry.service",
        "entry.action",
        "entry.outcome",
        "request_id",
    }
    with pytest.raises(InvalidArgument):
        await audit.append(entry(2, trace_id="not-a-trace"), "t")
    assert await keys_snapshot(redis_client, key_prefix) == before


async def test_proof_requests_past_the_tree_are_out_of_range(audit: AuditLog) -> None:
    for n in range(3):
        await audit.append(entry(n), f"r{n}")
    with pytest.raises(OutOfRange) as info:
        await audit.inclusion_proof(3)
    assert info.value.field_violations[0].field == "index"
    with pytest.raises(OutOfRange):
        await audit.inclusion_proof(0, tree_size=4)
    with pytest.raises(OutOfRange):
        await audit.consistency_proof(2, new_size=9)
    with pytest.raises(OutOfRange):
        await audit.consistency_proof(3, new_size=2)
    with pytest.raises(OutOfRange):
        await audit.entry(3)
    assert await audit.size() == 3


async def test_negative_and_past_the_end_numbers_get_one_code_each(audit: AuditLog) -> None:
    for n in range(3):
        await audit.append(entry(n), f"r{n}")
    negative = {
        "entry(-1)": (audit.entry(-1), "index"),
        "inclusion_proof(-1)": (audit.inclusion_proof(-1), "index"),
        "inclusion_proof(0, -1)": (audit.inclusion_proof(0, tree_size=-1), "tree_size"),
        "consistency_proof(-1)": (audit.consistency_proof(-1), "old_size"),
        "consistency_proof(0, -1)": (audit.consistency_proof(0, new_size=-1), "new_size"),
    }
    for what, (call, field) in negative.items():
        with pytest.raises(InvalidArgument) as bad:
            await call
        assert bad.value.reason == "NEGATIVE_NUMBER", what
        assert [v.field for v in bad.value.field_violations] == [field], what
        assert "past" not in bad.value.message, what
    past = {
        "entry(3)": (audit.entry(3), "index"),
        "entry(2**62)": (audit.entry(2**62), "index"),
        "inclusion_proof(3)": (audit.inclusion_proof(3), "index"),
        "inclusion_proof(0, 4)": (audit.inclusion_proof(0, tree_size=4), "tree_size"),
        "consistency_proof(4)": (audit.consistency_proof(4), "old_size"),
        "consistency_proof(3, 2)": (audit.consistency_proof(3, new_size=2), "old_size"),
        "consistency_proof(0, 9)": (audit.consistency_proof(0, new_size=9), "new_size"),
    }
    for what, (call, field) in past.items():
        with pytest.raises(OutOfRange) as out:
            await call
        assert out.value.reason == "PAST_TREE_SIZE", what
        assert [v.field for v in out.value.field_violations] == [field], what


SIZES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33]


async def test_stored_proofs_verify_at_many_sizes(audit: AuditLog) -> None:
    roots = {0: merkle.EMPTY_ROOT}
    leaves: list[bytes] = []
    for n in range(max(SIZES)):
        got = await audit.append(entry(n), f"r{n}")
        leaves.append(got.leaf_hash)
        roots[n + 1] = got.checkpoint.body.root_hash
        assert roots[n + 1] == merkle.root_of(leaves)
    for size in SIZES:
        assert await audit.root_at(size) == roots[size]
        for i in {0, size // 2, size - 1}:
            _, proof = await audit.inclusion_proof(i, size)
            assert merkle.verify_inclusion(i, size, leaves[i], proof, roots[size])
        for old in {0, 1, size // 2, size - 1, size}:
            _, proof = await audit.consistency_proof(old, size)
            assert merkle.verify_consistency(old, size, proof, roots[old], roots[size])


async def test_list_entries_filters_and_pages(audit: AuditLog) -> None:
    for n in range(30):
        e = entry(n, type="infra.sync" if n % 3 == 0 else "deployment.applied")
        e.time.FromSeconds(1_700_000_000 + n)
        await audit.append(e, f"r{n}")
    page, token = await audit.list_entries(EntryFilter(type="infra.sync"), 4, "")
    assert [e.index for e in page] == [0, 3, 6, 9] and token
    page, token = await audit.list_entries(EntryFilter(type="infra.sync"), 4, token)
    assert [e.index for e in page] == [12, 15, 18, 21]
    page, token = await audit.list_entries(EntryFilter(type="infra.sync"), 4, token)
    assert [e.index for e in page] == [24, 27] and token == ""
    window = EntryFilter(start_us=(1_700_000_000 + 10) * 10**6, end_us=(1_700_000_000 + 14) * 10**6)
    page, token = await audit.list_entries(window, 0, "")
    assert [e.index for e in page] == [10, 11, 12, 13] and token == ""
    page, _ = await audit.list_entries(EntryFilter(), 5, "")
    assert [e.index for e in page] == [0, 1, 2, 3, 4]
    with pytest.raises(InvalidArgument):
        await audit.list_entries(EntryFilter(), 5, "garbage!")


async def test_another_signing_key_is_refused(
    redis_client: aioredis.Redis, key_prefix: str, audit: AuditLog
) -> None:
    await audit.append(entry(0), "r0")
    impostor = AuditLog(
        audit.store.__class__(redis_client, audit.store.base), NoteSigner.generate(ORIGIN), ORIGIN
    )
    with pytest.raises(FailedPrecondition) as info:
        await impostor.append(entry(1), "r1")
    assert info.value.reason == "SIGNING_KEY_MISMATCH"
    assert await audit.size() == 1


async def test_a_restarted_writer_detects_a_tree_that_does_not_match_its_checkpoint(
    redis_client: aioredis.Redis, audit: AuditLog, signer: NoteSigner
) -> None:
    for n in range(4):
        await audit.append(entry(n), f"r{n}")
    await redis_client.setrange(audit.store.tree_key(2, 0), 0, b"\x00" * 32)
    restarted = AuditLog(audit.store.__class__(redis_client, audit.store.base), signer, ORIGIN)
    with pytest.raises(DataLoss, match="does not match the latest signed checkpoint"):
        await restarted.append(entry(9), "r9")


async def test_stored_bytes_are_canonical_json_of_the_proto3_form(audit: AuditLog) -> None:
    e = entry(1, trace_id="0af7651916cd43dd8448eb211c80319c", decision_id="d-1")
    got = await audit.append(e, "x")
    stored = await audit.entry(got.index)
    doc = json.loads(stored.data)
    assert doc["traceId"] == "0af7651916cd43dd8448eb211c80319c" and doc["decisionId"] == "d-1"
    assert list(doc) == sorted(doc)
    assert (
        stored.data
        == json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    )


async def test_a_batch_lands_in_order_in_few_commits(audit: AuditLog) -> None:
    before = audit.commits
    got = await audit.append_many([(entry(n), f"batch-{n}") for n in range(300)])
    assert [a.index for a in got] == list(range(300))
    assert audit.commits - before <= 2
    stored = await audit.entries([0, 150, 299])
    assert [s.entry.details["n"] for s in stored] == [0, 150, 299]
    # The same batch again appends nothing and returns the original places.
    again = await audit.append_many([(entry(n), f"batch-{n}") for n in range(300)])
    assert [a.index for a in again] == list(range(300))
    assert all(a.replayed for a in again)
    assert await audit.size() == 300


async def test_a_batch_with_one_bad_entry_appends_nothing(audit: AuditLog) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await audit.append_many([(entry(0), "ok-0"), (entry(1, action=""), "ok-1")])
    assert caught.value.field_violations[0].field == "requests[1].entry.action"
    assert await audit.size() == 0


async def test_a_batch_may_mix_new_entries_and_replays(audit: AuditLog) -> None:
    first = await audit.append(entry(0), "mix-0")
    got = await audit.append_many([(entry(0), "mix-0"), (entry(1), "mix-1")])
    assert got[0].index == first.index and got[0].replayed
    assert got[1].index == 1 and not got[1].replayed
