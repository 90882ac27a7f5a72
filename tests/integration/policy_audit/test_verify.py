"""Tampering with the stored log directly in Redis, and `audit verify` naming the index."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from autoecoops.kernel.cli import main
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteSigner
from autoecoops.kernel.policy_audit.trail import AuditLog
from autoecoops.kernel.policy_audit.verify import verify
from tests.integration.policy_audit.conftest import entry

N = 40


async def fill(audit: AuditLog, n: int = N) -> CheckpointBody:
    for i in range(n):
        await audit.append(entry(i), f"r{i}")
    return (await audit.checkpoint()).body


async def stream(client: aioredis.Redis, audit: AuditLog) -> list[bytes]:
    return [f[b"e"] for _, f in await client.xrange(audit.store.entries_key)]


async def rewrite(client: aioredis.Redis, audit: AuditLog, entries: list[bytes]) -> None:
    """Replace the stored entries wholesale, renumbering the stream ids (a careful attacker)."""
    await client.delete(audit.store.entries_key)
    for i, data in enumerate(entries):
        await client.xadd(audit.store.entries_key, {"e": data}, id=f"{i}-1")


def edit(data: bytes, **changes: object) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


async def test_an_untouched_log_verifies(audit: AuditLog) -> None:
    trusted = await fill(audit)
    result = await verify(audit.store, trusted)
    assert result.ok and result.checked == N
    ranged = await verify(audit.store, trusted, 10, 25)
    assert ranged.ok and ranged.checked == 15


async def test_a_modified_entry_is_named(audit: AuditLog, redis_client: aioredis.Redis) -> None:
    trusted = await fill(audit)
    entries = await stream(redis_client, audit)
    entries[17] = edit(entries[17], outcome="OUTCOME_DENIED")
    await rewrite(redis_client, audit, entries)
    result = await verify(audit.store, trusted)
    assert [(f.index, f.end) for f in result.findings] == [(17, None)]
    assert "content was modified" in result.findings[0].message
    # A range check over the changed entry finds it too; one beside it does not.
    assert [f.index for f in (await verify(audit.store, trusted, 10, 20)).findings] == [17]
    assert (await verify(audit.store, trusted, 20, 30)).ok


async def test_a_deleted_entry_is_named(audit: AuditLog, redis_client: aioredis.Redis) -> None:
    trusted = await fill(audit)
    await redis_client.xdel(audit.store.entries_key, "9-1")
    result = await verify(audit.store, trusted)
    assert result.findings[0].index == 9 and "deleted" in result.findings[0].message
    # Deleting and renumbering the rest to hide the gap is caught at the same index.
    entries = await stream(redis_client, audit)
    await rewrite(redis_client, audit, entries)
    result = await verify(audit.store, trusted)
    assert result.findings[0].index == 9
    assert "entry 10" in result.findings[0].message


async def test_an_inserted_entry_is_named(audit: AuditLog, redis_client: aioredis.Redis) -> None:
    trusted = await fill(audit)
    entries = await stream(redis_client, audit)
    forged = edit(entries[5], action="deployments.delete", index="5")
    await rewrite(redis_client, audit, [*entries[:5], forged, *entries[5:]])
    result = await verify(audit.store, trusted)
    assert [f.index for f in result.findings] == [5]


async def test_reordered_entries_are_named(audit: AuditLog, redis_client: aioredis.Redis) -> None:
    trusted = await fill(audit)
    entries = await stream(redis_client, audit)
    entries[21], entries[30] = entries[30], entries[21]
    await rewrite(redis_client, audit, entries)
    result = await verify(audit.store, trusted)
    assert result.findings[0].index == 21
    assert "is entry 30" in result.findings[0].message


async def test_rewriting_entries_and_tree_nodes_together_is_still_caught(
    audit: AuditLog, redis_client: aioredis.Redis
) -> None:
    trusted = await fill(audit)
    entries = await stream(redis_client, audit)
    entries[3] = edit(entries[3], resource="iaops/deployments/evil")
    await rewrite(redis_client, audit, entries)
    # Recompute the leaf node too, as an attacker covering their tracks would.
    from autoecoops.kernel.policy_audit import merkle

    await redis_client.setrange(audit.store.tree_key(0, 3), 3 * 32, merkle.leaf_hash(entries[3]))
    result = await verify(audit.store, trusted)
    assert len(result.findings) == 1
    finding = result.findings[0]
    assert finding.index <= 3 < (finding.end or finding.index + 1)


async def test_consistency_with_an_earlier_checkpoint(
    audit: AuditLog, redis_client: aioredis.Redis
) -> None:
    earlier = await fill(audit, 20)
    for i in range(20, N):
        await audit.append(entry(i), f"r{i}")
    trusted = (await audit.checkpoint()).body
    result = await verify(audit.store, trusted, earlier=earlier)
    assert result.ok and any("consistent with the earlier" in n for n in result.notes)
    # An "earlier" checkpoint that the verified log does not extend contradicts
    # the trusted one: a fork of the log, not a changed entry.
    forged = dataclasses.replace(earlier, root_hash=b"\x01" * 32)
    result = await verify(audit.store, trusted, earlier=forged)
    assert not result.ok and [f.kind for f in result.findings] == ["fork"]
    assert "FORK" in result.findings[0].message
    # History rewritten after the earlier checkpoint was kept (and re-signed by a
    # compromised server) still fails against it.
    entries = await stream(redis_client, audit)
    entries[2] = edit(entries[2], action="nothing.happened")
    await rewrite(redis_client, audit, entries)
    result = await verify(audit.store, trusted, earlier=earlier)
    assert [f.index for f in result.findings] == [2, 2]
    assert "earlier checkpoint of size 20" in result.findings[1].message
    # A range that does not cover the change cannot see it, and says it is fine.
    assert (await verify(audit.store, trusted, 20, N, earlier=earlier)).ok


async def test_cli_verify_names_the_index_and_rejects_a_wrong_key(
    audit: AuditLog,
    redis_client: aioredis.Redis,
    signer: NoteSigner,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(audit, 12)
    note = (await audit.checkpoint()).note
    (tmp_path / "cp.note").write_text(note)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("AUTOECOOPS_KEY_PREFIX", key_prefix)
    args = ["audit", "verify", "--checkpoint", str(tmp_path / "cp.note")]
    assert await asyncio.to_thread(main, [*args, "--key", signer.verifier.vkey()]) == 0
    assert "OK: entries 0..11 of 12" in capsys.readouterr().out

    other = NoteSigner.generate(signer.name).verifier.vkey()
    assert await asyncio.to_thread(main, [*args, "--key", other]) == 1
    assert "does not verify with this key" in capsys.readouterr().out

    entries = await stream(redis_client, audit)
    entries[7] = edit(entries[7], outcome="OUTCOME_FAILURE")
    await rewrite(redis_client, audit, entries)
    (tmp_path / "key.pub").write_text(signer.verifier.vkey() + "\n")
    assert await asyncio.to_thread(main, [*args, "--key", str(tmp_path / "key.pub")]) == 1
    out = capsys.readouterr().out
    assert "FAIL: index 7: the entry's content was modified" in out


async def test_a_newer_earlier_checkpoint_is_checked_not_waved_through(
    audit: AuditLog, redis_client: aioredis.Redis
) -> None:
    older = await fill(audit, 20)
    for i in range(20, N):
        await audit.append(entry(i), f"r{i}")
    newer = (await audit.checkpoint()).body
    # Given the other way round, the log must still extend one to the other.
    result = await verify(audit.store, older, earlier=newer)
    assert result.ok, result.findings
    assert any("extends it" in n for n in result.notes)
    # A tampered entry past the older checkpoint is caught against the newer one.
    entries = await stream(redis_client, audit)
    entries[30] = edit(entries[30], action="nothing.happened")
    await rewrite(redis_client, audit, entries)
    result = await verify(audit.store, older, earlier=newer)
    assert [f.index for f in result.findings] == [30]
    assert "newer checkpoint of size 40" in result.findings[0].message


async def test_contradicting_signed_checkpoints_are_a_fork(audit: AuditLog) -> None:
    trusted = await fill(audit, 20)
    # The same size, another root: the signer committed to two histories.
    twin = dataclasses.replace(trusted, root_hash=b"\x02" * 32)
    result = await verify(audit.store, trusted, earlier=twin)
    assert [f.kind for f in result.findings] == ["fork"]
    assert "changed" not in result.findings[0].message
    # A newer checkpoint whose first entries differ from the verified ones.
    for i in range(20, 30):
        await audit.append(entry(i), f"r{i}")
    newer = dataclasses.replace((await audit.checkpoint()).body, root_hash=b"\x03" * 32)
    result = await verify(audit.store, trusted, earlier=newer)
    assert [f.kind for f in result.findings] == ["fork"]


async def test_truncation_is_reported_as_one_range(
    audit: AuditLog, redis_client: aioredis.Redis
) -> None:
    trusted = await fill(audit)
    entries = await stream(redis_client, audit)
    await rewrite(redis_client, audit, entries[:25])
    await redis_client.hset(audit.store.head_key, "size", 25)
    result = await verify(audit.store, trusted)
    truncated = [f for f in result.findings if f.kind == "truncated"]
    assert [(f.index, f.end) for f in truncated] == [(25, N)], result.findings
    assert "truncated" in str(truncated[0]) and "indexes 25..39" in str(truncated[0])
    # Entries deleted in the middle are one range too, not one line each.
    await rewrite(redis_client, audit, [*entries[:5], *entries[5:]])
    await redis_client.hset(audit.store.head_key, "size", N)
    for i in range(10, 14):
        await redis_client.xdel(audit.store.entries_key, f"{i}-1")
    result = await verify(audit.store, trusted)
    missing = [(f.index, f.end, f.kind) for f in result.findings if f.kind == "missing"]
    assert missing == [(10, 14, "missing")]
