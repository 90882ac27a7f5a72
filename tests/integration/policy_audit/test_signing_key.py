"""policy-audit started with a signing key that does not match its log: every
call that needs the key answers FAILED_PRECONDITION SIGNING_KEY_MISMATCH (not
INTERNAL from a checkpoint that does not verify), health says NOT_SERVING,
and the number checks of the read RPCs answer one code per kind."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.errors import from_rpc_error
from autoecoops.kernel.policy_audit.checkpoint import NoteSigner
from tests.conftest import MintToken, StartMesh
from tests.integration.policy_audit.conftest import entry

AUDIT = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


async def test_a_mismatched_key_fails_checkpoints_like_appends_and_health_says_so(
    start_mesh: StartMesh,
    mint_token: MintToken,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: object,
) -> None:
    md = [("authorization", f"Bearer {mint_token('root', ['admin'])}")]
    first = await start_mesh(["auth-service", "policy-audit"], secure=True)
    async with grpc.aio.insecure_channel(first.config.addr("policy-audit")) as ch:
        await audit_pb2_grpc.AuditServiceStub(ch).AppendEntry(
            audit_pb2.AppendEntryRequest(entry=entry(0), request_id="k-0"), metadata=md
        )
    await first.stop(grace=0)

    # The same log in Redis, and a service started with another key.
    other = NoteSigner.generate("autoecoops.audit/v1")
    key_file = first.config.data_dir / "other.key"
    key_file.write_text(other.skey() + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("AUTOECOOPS_POLICY_AUDIT_SIGNING_KEY_FILE", str(key_file))
    second = await start_mesh(["auth-service", "policy-audit"], secure=True)
    async with grpc.aio.insecure_channel(second.config.addr("policy-audit")) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        calls = {
            "GetCheckpoint": stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md),
            "AppendEntry": stub.AppendEntry(
                audit_pb2.AppendEntryRequest(entry=entry(1), request_id="k-1"), metadata=md
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
            assert from_rpc_error(info.value).reason == "SIGNING_KEY_MISMATCH", name
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", AUDIT):
            got = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        # The entries are still readable: only signing needs the key.
        read = await stub.GetEntry(audit_pb2.GetEntryRequest(index=0), metadata=md)
        assert read.entry.index == 0
    assert "signed by" in second.runtime.unhealthy["policy-audit"]


async def test_numbers_get_one_code_per_kind_over_grpc(
    start_mesh: StartMesh, mint_token: MintToken
) -> None:
    md = [("authorization", f"Bearer {mint_token('root', ['admin'])}")]
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    async with grpc.aio.insecure_channel(mesh.config.addr("policy-audit")) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        for n in range(2):
            await stub.AppendEntry(
                audit_pb2.AppendEntryRequest(entry=entry(n), request_id=f"n-{n}"), metadata=md
            )
        cases = [
            (stub.GetEntry(audit_pb2.GetEntryRequest(index=-1), metadata=md), "INVALID_ARGUMENT"),
            (
                stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=-1), metadata=md),
                "INVALID_ARGUMENT",
            ),
            (
                stub.GetConsistencyProof(
                    audit_pb2.GetConsistencyProofRequest(old_size=-1), metadata=md
                ),
                "INVALID_ARGUMENT",
            ),
            (stub.GetEntry(audit_pb2.GetEntryRequest(index=2), metadata=md), "OUT_OF_RANGE"),
            (
                stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=2), metadata=md),
                "OUT_OF_RANGE",
            ),
            (
                stub.GetConsistencyProof(
                    audit_pb2.GetConsistencyProofRequest(old_size=3), metadata=md
                ),
                "OUT_OF_RANGE",
            ),
        ]
        for call, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code().name == code, info.value.details()
            assert "past new_size" not in (info.value.details() or "")
