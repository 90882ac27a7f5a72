"""`audit verify --api`: the running log checked through its gRPC API, every
hash recomputed locally, as a transparency-log monitor checks a log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.cli import main
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteSigner, NoteVerifier
from autoecoops.kernel.policy_audit.monitor import GrpcLogApi, monitor
from tests.conftest import MintToken, StartMesh, base_key, free_port
from tests.integration.policy_audit.conftest import entry

N = 12


@pytest.fixture
async def mesh(start_mesh: StartMesh) -> Mesh:
    return await start_mesh(["auth-service", "policy-audit"], secure=True)


@pytest.fixture
def token(mint_token: MintToken) -> str:
    return mint_token("monitor", ["viewer"])


async def fill(mesh: Mesh, admin: str, n: int = N, first: int = 0) -> None:
    async with grpc.aio.insecure_channel(mesh.config.addr("policy-audit")) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        for i in range(first, first + n):
            await stub.AppendEntry(
                audit_pb2.AppendEntryRequest(entry=entry(i), request_id=f"m-{i}"),
                metadata=[("authorization", f"Bearer {admin}")],
            )


def signer_of(mesh: Mesh) -> NoteSigner:
    key = mesh.config.data_dir / "policy-audit" / "checkpoint.key"
    return NoteSigner.from_skey(key.read_text().strip())


async def run_monitor(mesh: Mesh, token: str, kept: list[CheckpointBody] = []) -> object:  # noqa: B006
    async with grpc.aio.insecure_channel(mesh.config.addr("policy-audit")) as ch:
        api = GrpcLogApi(
            audit_pb2_grpc.AuditServiceStub(ch), [("authorization", f"Bearer {token}")], 10
        )
        return await monitor(api, signer_of(mesh).verifier, kept)


async def test_an_untouched_log_verifies_through_the_api(
    mesh: Mesh, mint_token: MintToken, token: str
) -> None:
    await fill(mesh, mint_token("root", ["admin"]))
    result = await run_monitor(mesh, token)
    assert result.ok, result.findings  # type: ignore[attr-defined]
    assert result.checked == N  # type: ignore[attr-defined]


async def test_an_entry_changed_in_the_store_is_named(
    mesh: Mesh, mint_token: MintToken, token: str, redis_url: str, key_prefix: str
) -> None:
    await fill(mesh, mint_token("root", ["admin"]))
    client = connect(redis_url)
    key = base_key(redis_url, key_prefix, "policy-audit") + ":{audit}:entries"
    stored = [f[b"e"] for _, f in await client.xrange(key)]
    doc = json.loads(stored[5])
    doc["outcome"] = "OUTCOME_DENIED"
    stored[5] = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    await client.delete(key)
    for i, data in enumerate(stored):
        await client.xadd(key, {"e": data}, id=f"{i}-1")
    await client.aclose()
    result = await run_monitor(mesh, token)
    assert [f.index for f in result.findings] == [5]  # type: ignore[attr-defined]
    assert "modified" in result.findings[0].message  # type: ignore[attr-defined]


async def test_a_kept_checkpoint_is_extended_or_a_fork_or_a_rollback(
    mesh: Mesh, mint_token: MintToken, token: str, redis_url: str, key_prefix: str
) -> None:
    admin = mint_token("root", ["admin"])
    await fill(mesh, admin, 6)
    first = await run_monitor(mesh, token)
    kept = first.body  # type: ignore[attr-defined]
    await fill(mesh, admin, 6, first=6)
    grown = await run_monitor(mesh, token, [kept])
    assert grown.ok and any("extends it" in n for n in grown.notes)  # type: ignore[attr-defined]

    # A signed checkpoint of size 6 with another root: the signer signed two histories.
    signer = signer_of(mesh)
    twin = CheckpointBody(kept.origin, kept.size, b"\x07" * 32)
    NoteVerifier.from_vkey(signer.verifier.vkey()).open(signer.sign(twin.text()))
    forked = await run_monitor(mesh, token, [twin])
    assert [f.kind for f in forked.findings] == ["fork"]  # type: ignore[attr-defined]

    # The server rolled back to the size-6 checkpoint after signing size 12.
    latest = grown.body  # type: ignore[attr-defined]
    client = connect(redis_url)
    head = base_key(redis_url, key_prefix, "policy-audit") + ":{audit}:head"
    await client.hset(head, mapping={"size": 6, "note": first.note})  # type: ignore[attr-defined]
    await client.aclose()
    rolled = await run_monitor(mesh, token, [latest])
    truncated = [f for f in rolled.findings if f.kind == "truncated"]  # type: ignore[attr-defined]
    assert [(f.index, f.end) for f in truncated] == [(6, 12)]


async def test_cli_verify_api_mode(
    mesh: Mesh,
    mint_token: MintToken,
    token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(mesh, mint_token("root", ["admin"]))
    vkey = signer_of(mesh).verifier.vkey()
    saved = tmp_path / "kept.note"
    monkeypatch.delenv("REDIS_URL", raising=False)
    args = ["audit", "verify", "--api", mesh.config.addr("policy-audit"), "--key", vkey]
    code = await asyncio.to_thread(main, [*args, "--token", token, "--save", str(saved)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"OK: entries 0..{N - 1} of {N}" in out
    assert CheckpointBody.parse(NoteVerifier.from_vkey(vkey).open(saved.read_text())).size == N
    # The next run checks the log against what the last one kept.
    code = await asyncio.to_thread(main, [*args, "--token", token, "--checkpoint", str(saved)])
    assert code == 0 and "consistent with the kept checkpoint" in capsys.readouterr().out
    # Another key: the served checkpoint is not trusted.
    other = NoteSigner.generate("autoecoops.audit/v1").verifier.vkey()
    args[-1] = other
    assert await asyncio.to_thread(main, [*args, "--token", token]) == 1
    assert "does not verify with this key" in capsys.readouterr().out


async def test_cli_verify_api_through_a_list_of_replicas(
    mesh: Mesh,
    mint_token: MintToken,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # AUTOECOOPS_POLICY_AUDIT_ADDR (or --api) naming replicas on loopback, one of
    # them down: plaintext as for one loopback address, and the live one answers.
    await fill(mesh, mint_token("root", ["admin"]))
    vkey = signer_of(mesh).verifier.vkey()
    monkeypatch.delenv("REDIS_URL", raising=False)
    listed = f"127.0.0.1:{free_port()},127.0.0.1:{mesh.config.port('policy-audit')}"
    for args in (
        ["--api", listed],
        ["--api"],  # from the variable
    ):
        monkeypatch.setenv("AUTOECOOPS_POLICY_AUDIT_ADDR", listed)
        argv = ["audit", "verify", *args, "--key", vkey, "--token", token]
        code = await asyncio.to_thread(main, argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"OK: entries 0..{N - 1} of {N}" in out
