"""policy-audit over gRPC with real tokens: Evaluate, bundles, the audit RPCs, bad input, reports."""

from __future__ import annotations

import asyncio
import base64
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteVerifier
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc
from tests.conftest import MintToken, StartMesh
from tests.integration.policy_audit.conftest import entry

DEPLOY_INPUT = {
    "target": {"environment": "staging", "namespace": "web"},
    "credentials": {"password": "hunter2"},
}


@pytest.fixture
async def mesh(
    start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Mesh]:
    monkeypatch.setenv("AUTOECOOPS_POLICY_AUDIT_BUNDLE_DIR", str(tmp_path / "bundles"))
    monkeypatch.setenv("AUTOECOOPS_POLICY_AUDIT_BUNDLE_POLL_SECONDS", "0.1")
    (tmp_path / "bundles").mkdir()
    yield await start_mesh(["auth-service", "policy-audit"], secure=True)


@pytest.fixture
def md(mint_token: MintToken) -> list[tuple[str, str]]:
    token = mint_token("alice", ["admin"], groups=["team-web"])
    return [("authorization", f"Bearer {token}")]


def stubs(mesh: Mesh) -> tuple[policy_pb2_grpc.PolicyServiceStub, audit_pb2_grpc.AuditServiceStub]:
    ch = grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    return policy_pb2_grpc.PolicyServiceStub(ch), audit_pb2_grpc.AuditServiceStub(ch)


def status(err: grpc.aio.AioRpcError) -> tuple[str, list[str], str]:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields = "", []
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return reason, fields, err.details() or ""


def value(doc: object) -> struct_pb2.Value:
    v = struct_pb2.Value()
    from google.protobuf import json_format

    json_format.ParseDict(doc, v)
    return v


async def wait_for(predicate: object) -> None:
    for _ in range(100):  # five seconds
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_evaluate_the_shipped_policy_and_log_the_masked_decision(
    mesh: Mesh, md: list[tuple[str, str]]
) -> None:
    policy, audit = stubs(mesh)

    async def shipped_loaded() -> bool:
        got = await policy.ListBundles(policy_pb2.ListBundlesRequest(), metadata=md)
        return any(b.name == "platform" for b in got.bundles)

    await wait_for(shipped_loaded)
    reply = await policy.Evaluate(
        policy_pb2.EvaluateRequest(path="autoecoops/deploy/decision", input=value(DEPLOY_INPUT)),
        metadata=md,
    )
    assert reply.defined and reply.bundle_revision.startswith("sha256:")
    # alice's identity reached the policy from her verified token, not from the input.
    assert reply.result.struct_value["allow"] is False
    reasons = list(reply.result.struct_value["reasons"])
    assert "alice has no role that may deploy to staging" in reasons
    page = await audit.ListEntries(
        audit_pb2.ListEntriesRequest(type="policy.decision"), metadata=md
    )
    [logged] = [e for e in page.entries if e.decision_id == reply.decision_id]
    details = logged.details
    assert logged.actor.subject == "alice" and len(logged.trace_id) == 32
    assert "credentials" not in details["input"]
    assert "claims" not in details["input"]["identity"]
    assert list(details["erased"]) == ["/input/credentials", "/input/identity/claims"]


async def test_bad_input_gets_invalid_argument_and_changes_nothing(
    mesh: Mesh, md: list[tuple[str, str]]
) -> None:
    policy, audit = stubs(mesh)
    before = (await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md)).checkpoint
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await policy.Evaluate(
            policy_pb2.EvaluateRequest(path="autoecoops/deploy/allow", input=value([1, 2])),
            metadata=md,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status(info.value)[:2] == ("INPUT_NOT_AN_OBJECT", ["input"])

    bad = policy_pb2.Bundle(
        name="broken",
        roots=["broken"],
        modules=[
            policy_pb2.PolicyModule(
                path="broken.rego", source="package broken\n\nallow if { input.x == }\n"
            )
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await policy.CreateBundle(policy_pb2.CreateBundleRequest(bundle=bad), metadata=md)
    reason, fields, message = status(info.value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "POLICY_COMPILE_ERROR" and fields == ["bundle.modules[0].source"]
    assert "broken.rego:3:20: Invalid boolean operator" in message
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await policy.GetBundle(policy_pb2.GetBundleRequest(name="broken"), metadata=md)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # Index 0 is a real index (proto3 cannot tell it from "unset").
    first = await audit.GetEntry(audit_pb2.GetEntryRequest(index=0), metadata=md)
    assert first.entry.index == 0
    for request in (
        audit_pb2.GetInclusionProofRequest(index=before.tree_size + 5),
        audit_pb2.GetInclusionProofRequest(index=1, tree_size=before.tree_size + 1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await audit.GetInclusionProof(request, metadata=md)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await audit.GetConsistencyProof(
            audit_pb2.GetConsistencyProofRequest(old_size=1, new_size=before.tree_size + 9),
            metadata=md,
        )
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE

    big = entry(1)
    big.details.update({"blob": "x" * 70_000})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await audit.AppendEntry(
            audit_pb2.AppendEntryRequest(entry=big, request_id="big"), metadata=md
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status(info.value)[0] == "ENTRY_TOO_LARGE"
    # Nothing was appended but the mesh's FAILURE records of the refused
    # audited calls (through the outbox, so flushed first): no decision, no
    # bundle, no oversized entry, and no SUCCESS entry.
    assert await mesh.runtime.auditor.relay.flush(within=5.0)  # type: ignore[union-attr]
    page = await audit.ListEntries(audit_pb2.ListEntriesRequest(page_size=100), metadata=md)
    added = [e for e in page.entries if e.index >= before.tree_size]
    assert sorted((e.type, e.outcome, e.action) for e in added) == [
        ("rpc", audit_pb2.OUTCOME_FAILURE, "autoecoops.policy.v1.PolicyService.CreateBundle"),
        ("rpc", audit_pb2.OUTCOME_FAILURE, "autoecoops.policy.v1.PolicyService.Evaluate"),
    ]


async def test_append_read_prove_and_check_the_checkpoint_signature(
    mesh: Mesh, md: list[tuple[str, str]]
) -> None:
    _, audit = stubs(mesh)
    await audit.AppendEntry(
        audit_pb2.AppendEntryRequest(entry=entry(0), request_id="a-0"), metadata=md
    )
    got = await audit.AppendEntry(
        audit_pb2.AppendEntryRequest(entry=entry(1), request_id="a-1"), metadata=md
    )
    again = await audit.AppendEntry(
        audit_pb2.AppendEntryRequest(entry=entry(1), request_id="a-1"), metadata=md
    )
    assert again.index == got.index
    keys = await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md)
    verifier = NoteVerifier.from_vkey(keys.verifier_key)
    assert keys.key_id == verifier.key_id
    body = CheckpointBody.parse(verifier.open(keys.checkpoint.signed_note))
    assert (body.size, body.root_hash) == (keys.checkpoint.tree_size, keys.checkpoint.root_hash)
    read = await audit.GetEntry(audit_pb2.GetEntryRequest(index=got.index), metadata=md)
    assert merkle.leaf_hash(read.entry_bytes) == read.leaf_hash == got.leaf_hash
    proof = await audit.GetInclusionProof(
        audit_pb2.GetInclusionProofRequest(index=got.index), metadata=md
    )
    assert merkle.verify_inclusion(
        got.index, proof.tree_size, read.leaf_hash, list(proof.hashes), body.root_hash
    )


async def test_bundle_lifecycle_and_hot_reload_from_the_directory(
    mesh: Mesh, md: list[tuple[str, str]], tmp_path: Path
) -> None:
    policy, _ = stubs(mesh)
    module = policy_pb2.PolicyModule(
        path="team/t.rego", source="package team\n\nallow if input.ok\n"
    )
    created = await policy.CreateBundle(
        policy_pb2.CreateBundleRequest(
            bundle=policy_pb2.Bundle(
                name="team", roots=["team"], modules=[module], masks=["/input/pw"]
            )
        ),
        metadata=md,
    )
    rev1 = created.bundle.revision
    ask = policy_pb2.EvaluateRequest(path="team/allow", input=value({"ok": True}))
    assert (await policy.Evaluate(ask, metadata=md)).bundle_revision == rev1
    module.source = "package team\n\nallow if input.ok == false\n"
    updated = await policy.UpdateBundle(
        policy_pb2.UpdateBundleRequest(
            bundle=policy_pb2.Bundle(name="team", modules=[module]),
            update_mask=field_mask_pb2.FieldMask(paths=["modules"]),
        ),
        metadata=md,
    )
    assert updated.bundle.revision != rev1 and list(updated.bundle.masks) == ["/input/pw"]
    reply = await policy.Evaluate(ask, metadata=md)
    assert reply.result.bool_value is False or not reply.defined
    await policy.DeleteBundle(policy_pb2.DeleteBundleRequest(name="team"), metadata=md)
    assert not (await policy.Evaluate(ask, metadata=md)).defined

    # A bundle dropped into the watched directory goes live without a restart,
    # and a change to its files replaces it.
    bundles = tmp_path / "bundles"
    src = tmp_path / "src"
    (src / "ops").mkdir(parents=True)
    (src / ".manifest").write_text(json.dumps({"roots": ["ops"]}))
    (src / "ops" / "p.rego").write_text("package ops\n\nlimit := data.ops.max\n")
    (src / "ops" / "data.json").write_text(json.dumps({"max": 3}))
    with tarfile.open(bundles / "ops.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")
    limit = policy_pb2.EvaluateRequest(path="ops/limit", input=value({}))

    async def limit_is(n: int) -> bool:
        got = await policy.Evaluate(limit, metadata=md)
        return got.defined and got.result.number_value == n

    await wait_for(lambda: limit_is(3))
    (bundles / "ops.tar.gz").unlink()
    (src / "ops" / "data.json").write_text(json.dumps({"max": 5}))
    import shutil

    shutil.copytree(src, bundles / "ops")
    await wait_for(lambda: limit_is(5))
    # Bundles from files are changed through their files, not by RPC.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await policy.DeleteBundle(policy_pb2.DeleteBundleRequest(name="ops"), metadata=md)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A broken edit keeps the last good revision serving.
    (bundles / "ops" / "ops" / "p.rego").write_text("package ops\n\nlimit := \n")
    await asyncio.sleep(0.4)
    assert await limit_is(5)


async def test_compliance_report_evidence_proofs_verify(
    mesh: Mesh, md: list[tuple[str, str]]
) -> None:
    _, audit = stubs(mesh)
    for n, approvers in enumerate([["bob"], ["alice"], []]):
        e = entry(n, decision_id=f"d{n}")
        e.details.update({"environment": "production", "approvers": approvers})
        await audit.AppendEntry(
            audit_pb2.AppendEntryRequest(entry=e, request_id=f"c{n}"), metadata=md
        )
    start = audit_pb2.GenerateComplianceReportRequest().start_time
    start.FromSeconds(0)
    got = await audit.GenerateComplianceReport(
        audit_pb2.GenerateComplianceReportRequest(
            start_time=start, frameworks=["SOC2"], format=audit_pb2.REPORT_FORMAT_HTML
        ),
        metadata=md,
    )
    report = got.report
    results = {c.control_id: c for c in report.controls}
    prod = results["production-changes-approved"]
    assert prod.result == audit_pb2.RESULT_FAIL
    # alice approving her own change and no approver at all both fail.
    assert sorted(json.loads(ev.entry_bytes)["details"]["approvers"] for ev in prod.evidence) == [
        [],
        ["alice"],
    ]
    root, size = report.checkpoint.root_hash, report.checkpoint.tree_size
    for control in report.controls:
        for ev in control.evidence:
            assert merkle.leaf_hash(ev.entry_bytes) == ev.leaf_hash
            assert merkle.verify_inclusion(
                ev.entry.index, size, ev.leaf_hash, list(ev.inclusion_proof), root
            )
    assert report.summary.fail_count >= 1
    assert "<h1>AutoEcoOps compliance report</h1>" in report.html
    assert base64.b64encode(report.checkpoint.root_hash).decode() in report.html
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await audit.GenerateComplianceReport(
            audit_pb2.GenerateComplianceReportRequest(start_time=start, frameworks=["ISO"]),
            metadata=md,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_without_a_token_nothing_is_served(mesh: Mesh) -> None:
    _, audit = stubs(mesh)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await audit.GetCheckpoint(audit_pb2.GetCheckpointRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
