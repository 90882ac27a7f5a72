"""IAOps over gRPC in a real mesh: auth-service (tokens, RBAC), policy-audit (Rego bundles,
decisions, the trail), event-bus (events), infra-manager (real Git, rendered manifests,
syncs, rollback) and iaops, on a real Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.iaops.v1 import events_pb2 as iaops_events
from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.iaops.v1 import iaops_pb2_grpc
from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster
from autoecoops.kernel.infra_manager.health import ready_status
from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc
from tests.conftest import MintToken, StartMesh, base_key
from tests.integration.infra_manager.gitrepo import GitRepo

NS = "web"


def app_yaml(image: str = "ghcr.io/autoecoops/web:1.0.0", privileged: bool = False) -> str:
    """A hardened Deployment and the namespace's default-deny policy."""
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {NS}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      securityContext: {{runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
        - name: web
          image: {image}
          resources: {{requests: {{cpu: 10m, memory: 32Mi}}, limits: {{cpu: 100m, memory: 64Mi}}}}
          livenessProbe: {{tcpSocket: {{port: 8080}}}}
          readinessProbe: {{tcpSocket: {{port: 8080}}}}
          securityContext:
            privileged: {str(privileged).lower()}
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {{drop: [ALL]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: {NS}
spec:
  podSelector: {{}}
  policyTypes: [Ingress, Egress]
"""


CONFTEST_POLICY = """\
package main

import rego.v1

deny contains msg if {
	input.kind == "Deployment"
	not input.spec.template.metadata.labels.team
	msg := concat("", ["Deployment ", input.metadata.name, " has no team label"])
}

warn contains msg if {
	input.kind == "NetworkPolicy"
	msg := "network policies are reviewed by security"
}

violation contains {"msg": "replicas must be at least 2", "details": {}} if {
	input.kind == "Deployment"
	input.spec.replicas < 2
}

deny_latest contains msg if {
	some c in input.spec.template.spec.containers
	endswith(c.image, ":latest")
	msg := "no latest tags"
}
"""


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS", "0.02")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_WAVE_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_EMBEDDED_SIMULATE_READY", "false")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOECOOPS_IAOPS_HEALTH_POLL_SECONDS", "0.05")
    monkeypatch.setenv("AUTOECOOPS_IAOPS_HEALTH_TIMEOUT_SECONDS", "20")
    monkeypatch.setenv("AUTOECOOPS_IAOPS_OSV_PATH", str(tmp_path / "osv"))
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "infra-manager", "iaops"], secure=True
    )


@pytest.fixture
async def controller(mesh: Mesh) -> AsyncIterator[None]:
    """Plays the Deployment controller: ready unless the image is "broken", then
    past its progress deadline (what a crash-looping rollout reports)."""
    cluster = EmbeddedCluster(
        connect(mesh.config.redis_url or ""),
        base_key(mesh.config.redis_url, mesh.config.key_prefix, "infra-manager") + ":cluster",
    )
    ref = Ref("apps", "v1", "Deployment", NS, "web")

    async def loop() -> None:
        while True:
            live = await cluster.get(ref)
            if live is not None:
                gen = live["metadata"].get("generation", 1)
                status = live.get("status") or {}
                if status.get("observedGeneration") != gen:
                    image = live["spec"]["template"]["spec"]["containers"][0]["image"]
                    if "broken" in image:
                        new = {
                            "observedGeneration": gen,
                            "conditions": [
                                {
                                    "type": "Progressing",
                                    "status": "False",
                                    "reason": "ProgressDeadlineExceeded",
                                }
                            ],
                        }
                    else:
                        new = ready_status(live) or {}
                    await cluster.set_status(ref, new)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await cluster.redis.aclose()


def stubs(mesh: Mesh) -> tuple[Any, Any, Any, Any, Any]:
    def ch(name: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(mesh.config.addr(name))

    return (
        iaops_pb2_grpc.IaOpsServiceStub(ch("iaops")),
        infra_pb2_grpc.InfraServiceStub(ch("infra-manager")),
        policy_pb2_grpc.PolicyServiceStub(ch("policy-audit")),
        audit_pb2_grpc.AuditServiceStub(ch("policy-audit")),
        events_pb2_grpc.EventBusServiceStub(ch("event-bus")),
    )


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def details(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    reason, fields = "", []
    for d in status_pb2.Status.FromString(raw).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if d.Unpack(info):
            reason = info.reason
        elif d.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return err.code(), reason, fields


async def fails(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return details(err.value)


async def events_on(bus: Any, md: Any, topic: str, want: int) -> list[events_pb2.Envelope]:
    got: list[events_pb2.Envelope] = []
    call = bus.Subscribe(
        events_pb2.SubscribeRequest(
            topic=topic,
            group="test",
            consumer="c1",
            start_position=events_pb2.START_POSITION_EARLIEST,
        ),
        metadata=md,
    )
    async for reply in call:
        got.append(reply.delivery.envelope)
        if len(got) == want:
            break
    call.cancel()
    return got


async def test_validate_files_and_conftest_rules_from_a_policy_audit_bundle(
    mesh: Mesh, mint_token: MintToken
) -> None:
    iaops, _, policy, _, _ = stubs(mesh)
    md = bearer(mint_token("alice", ["admin"]))
    files = [
        pb.ManifestFile(path="deploy/app.yaml", content=app_yaml("nginx:latest", privileged=True))
    ]

    builtin = (
        await iaops.ValidateManifests(pb.ValidateManifestsRequest(files=files), metadata=md)
    ).report
    assert not builtin.passed and builtin.resource_count == 2
    priv = next(f for f in builtin.findings if f.rule_id == "AEO-K8S-001")
    assert (priv.file, priv.line, priv.resource.kind, priv.resource.name) == (
        "deploy/app.yaml",
        20,
        "Deployment",
        "web",
    )
    assert priv.severity == 5 and priv.remediation and priv.source == "builtin"

    await policy.CreateBundle(
        policy_pb2.CreateBundleRequest(
            bundle=policy_pb2.Bundle(
                name="conftest-rules",
                roots=["main"],
                modules=[
                    policy_pb2.PolicyModule(path="policy/deployment.rego", source=CONFTEST_POLICY)
                ],
            )
        ),
        metadata=md,
    )
    reply = await iaops.ValidateManifests(
        pb.ValidateManifestsRequest(
            files=files, policy_bundle="conftest-rules", report_format=pb.REPORT_FORMAT_SARIF
        ),
        metadata=md,
    )
    rego = {(f.rule_id, f.message, f.line) for f in reply.report.findings if f.source == "rego"}
    assert rego == {
        ("rego:main.deny", "Deployment web has no team label", 1),
        ("rego:main.violation", "replicas must be at least 2", 1),
        ("rego:main.deny_latest", "no latest tags", 1),
        ("rego:main.warn", "network policies are reviewed by security", 25),
    }
    assert reply.report.policy_bundle == "conftest-rules"
    warn = next(f for f in reply.report.findings if f.rule_id == "rego:main.warn")
    assert warn.severity == 2  # LOW: a warning
    sarif = json.loads(reply.rendered_report)
    assert sarif["version"] == "2.1.0" and len(sarif["runs"][0]["results"]) == len(
        reply.report.findings
    )

    # Bad input: both inputs, neither, an unknown bundle, a package outside its roots, an unknown rule.
    assert await fails(iaops.ValidateManifests(pb.ValidateManifestsRequest(), metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "ONE_INPUT_REQUIRED",
        ["files", "application"],
    )
    code, reason, _ = await fails(
        iaops.ValidateManifests(
            pb.ValidateManifestsRequest(files=files, policy_bundle="nope"), metadata=md
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, reason, fields = await fails(
        iaops.ValidateManifests(
            pb.ValidateManifestsRequest(
                files=files, policy_bundle="conftest-rules", policy_packages=["other"]
            ),
            metadata=md,
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_OUTSIDE_BUNDLE",
        ["policy_packages"],
    )
    code, reason, fields = await fails(
        iaops.ValidateManifests(
            pb.ValidateManifestsRequest(files=files, skip_rules=["no-such-rule"]), metadata=md
        )
    )
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_RULE",
        ["skip_rules"],
    )
    # Without a token: UNAUTHENTICATED.
    code, _, _ = await fails(iaops.ValidateManifests(pb.ValidateManifestsRequest(files=files)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def make_app(infra: Any, md: Any, repo: GitRepo) -> None:
    await infra.CreateApplication(
        infra_pb2.CreateApplicationRequest(
            application=infra_pb2.Application(
                name="web",
                source=infra_pb2.ApplicationSource(
                    repo_url=repo.url, target_revision="main", path="deploy"
                ),
                destination=infra_pb2.ApplicationDestination(namespace=NS),
            )
        ),
        metadata=md,
    )


async def test_deployments_end_to_end_through_the_kernel(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path, controller: None
) -> None:
    iaops, infra, _, audit, bus = stubs(mesh)
    admin = bearer(mint_token("alice", ["admin"]))
    # bob: RBAC admin for the RPCs; for the deploy policy a deployer in team-web (owns "web").
    bob = bearer(mint_token("bob", ["admin", "deployer"], groups=["team-web"]))
    repo = GitRepo(tmp_path / "repo")
    first = repo.commit({"deploy/app.yaml": app_yaml()})
    await make_app(infra, admin, repo)

    # The application's manifests, rendered by infra-manager, validated with their lines.
    rendered = await iaops.ValidateManifests(
        pb.ValidateManifestsRequest(application="web"), metadata=bob
    )
    assert rendered.report.passed and rendered.report.revision == first
    assert rendered.report.resource_count == 2

    request = pb.CreateDeploymentRequest(
        deployment=pb.Deployment(application="web", environment="staging", description="first"),
        deployment_id="web-1",
        request_id="req-1",
    )
    done = (await iaops.CreateDeployment(request, metadata=bob)).deployment
    assert done.state == pb.DEPLOYMENT_STATE_SUCCEEDED, done.message
    assert done.name == "deployments/web-1" and done.resolved_revision == first
    assert done.target_namespace == NS and done.requested_by == "bob" and done.decision_id
    assert [c.type for c in done.conditions] == ["Validated", "Allowed", "Synced", "Healthy"]
    assert all(c.status == 1 for c in done.conditions) and done.etag and done.trace_id
    # A retry with the same request_id is the same deployment, not a second one.
    again = (await iaops.CreateDeployment(request, metadata=bob)).deployment
    assert again.name == done.name and again.etag == done.etag
    reused = pb.CreateDeploymentRequest(
        request_id="req-1", deployment=pb.Deployment(application="web", environment="production")
    )
    assert (await fails(iaops.CreateDeployment(reused, metadata=bob)))[1] == "REQUEST_ID_REUSED"

    # Every step in the audit trail, under the request's one trace id.
    entries = (
        await audit.ListEntries(
            audit_pb2.ListEntriesRequest(trace_id=done.trace_id, page_size=100), metadata=admin
        )
    ).entries
    steps = [e.type for e in entries if e.type.startswith("iaops.deployment.")]
    assert steps == [
        f"iaops.deployment.{s}"
        for s in ("requested", "validated", "decided", "synced", "health", "completed")
    ]
    assert {e.resource for e in entries if e.type.startswith("iaops.")} == {
        "iaops/deployments/web-1"
    }
    decided = next(e for e in entries if e.type == "iaops.deployment.decided")
    assert decided.decision_id == done.decision_id and decided.actor.subject == "bob"
    rpc = [e for e in entries if e.type == "rpc" and e.action.endswith("CreateDeployment")]
    assert rpc and rpc[0].resource == "web"  # resource_field: deployment.application
    assert any(e.type == "policy.decision" for e in entries)  # policy-audit's own, same trace

    # Production without an approval: denied by policy, nothing synced.
    prod = pb.CreateDeploymentRequest(
        deployment=pb.Deployment(application="web", environment="production")
    )
    denied = (await iaops.CreateDeployment(prod, metadata=bob)).deployment
    assert denied.state == pb.DEPLOYMENT_STATE_REJECTED and not denied.sync_operation_id
    assert any("approv" in r for r in denied.denial_reasons), denied.denial_reasons
    prod.deployment.approvers.append("carol")
    approved = (await iaops.CreateDeployment(prod, metadata=bob)).deployment
    assert approved.state == pb.DEPLOYMENT_STATE_SUCCEEDED, approved.message

    # Manifests that fail validation are rejected before any policy or sync.
    bad = repo.commit({"deploy/app.yaml": app_yaml(privileged=True)})
    rejected = (
        await iaops.CreateDeployment(
            pb.CreateDeploymentRequest(
                deployment=pb.Deployment(application="web", environment="staging", revision=bad)
            ),
            metadata=bob,
        )
    ).deployment
    assert rejected.state == pb.DEPLOYMENT_STATE_REJECTED and rejected.validation.failure_count >= 1
    assert [c.type for c in rejected.conditions] == ["Validated"] and not rejected.decision_id

    # A rollout that never becomes healthy is rolled back through infra-manager.
    broken = repo.commit({"deploy/app.yaml": app_yaml(image="ghcr.io/autoecoops/web:broken")})
    rolled = (
        await iaops.CreateDeployment(
            pb.CreateDeploymentRequest(
                deployment=pb.Deployment(application="web", environment="staging", revision=broken)
            ),
            metadata=bob,
        )
    ).deployment
    assert rolled.state == pb.DEPLOYMENT_STATE_ROLLED_BACK, rolled.message
    assert rolled.rollback_operation_id and rolled.conditions[-1].type == "RolledBack"
    live = (
        await infra.GetApplication(infra_pb2.GetApplicationRequest(name="web"), metadata=admin)
    ).application
    assert live.status.operation_state.id == rolled.rollback_operation_id
    assert live.status.operation_state.revision == first

    # Events: requested/completed per deployment, on the real bus.
    env = await events_on(bus, admin, "iaops.deployment", 2)
    assert [e.type for e in env] == [
        "autoecoops.iaops.deployment.requested",
        "autoecoops.iaops.deployment.completed",
    ]
    completed = iaops_events.DeploymentCompleted()
    env[1].data.Unpack(completed)
    assert (completed.deployment, completed.state) == (
        "deployments/web-1",
        pb.DEPLOYMENT_STATE_SUCCEEDED,
    )

    # Get, list (newest first, filtered, paged) and update with an etag.
    got = (
        await iaops.GetDeployment(pb.GetDeploymentRequest(name="deployments/web-1"), metadata=bob)
    ).deployment
    assert got == done
    listed = await iaops.ListDeployments(pb.ListDeploymentsRequest(page_size=2), metadata=bob)
    assert len(listed.deployments) == 2 and listed.deployments[0].name == rolled.name
    rest = await iaops.ListDeployments(
        pb.ListDeploymentsRequest(page_size=10, page_token=listed.next_page_token), metadata=bob
    )
    assert [d.name for d in rest.deployments][
        -1
    ] == "deployments/web-1" and not rest.next_page_token
    only = await iaops.ListDeployments(
        pb.ListDeploymentsRequest(state=pb.DEPLOYMENT_STATE_REJECTED), metadata=bob
    )
    assert {d.name for d in only.deployments} == {denied.name, rejected.name}
    change = pb.Deployment(name=done.name, etag=done.etag, description="the first one")
    updated = (
        await iaops.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=change, update_mask=field_mask_pb2.FieldMask(paths=["description"])
            ),
            metadata=bob,
        )
    ).deployment
    assert updated.description == "the first one" and updated.etag != done.etag
    assert (
        await fails(
            iaops.UpdateDeployment(pb.UpdateDeploymentRequest(deployment=change), metadata=bob)
        )
    )[:2] == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert (
        await fails(
            iaops.GetDeployment(pb.GetDeploymentRequest(name="deployments/nope"), metadata=bob)
        )
    )[0] == grpc.StatusCode.NOT_FOUND
    assert (await fails(iaops.GetDeployment(pb.GetDeploymentRequest(name="nope"), metadata=bob)))[
        1
    ] == "INVALID_NAME"
    # REQUIRED fields are checked by the mesh from the contract, the rest by IAOps.
    code, _, fields = await fails(
        iaops.CreateDeployment(pb.CreateDeploymentRequest(deployment=pb.Deployment()), metadata=bob)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {"deployment.application", "deployment.environment"}
    bad_req = pb.CreateDeploymentRequest(
        deployment=pb.Deployment(
            application="web", environment="staging", risk="extreme", name="x"
        ),
        deployment_id="Bad_Id",
    )
    code, reason, fields = await fails(iaops.CreateDeployment(bad_req, metadata=bob))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DEPLOYMENT")
    assert set(fields) == {"deployment.risk", "deployment_id", "deployment.name"}
    taken = pb.CreateDeploymentRequest(
        deployment=pb.Deployment(application="web", environment="staging"), deployment_id="web-1"
    )
    assert (await fails(iaops.CreateDeployment(taken, metadata=bob)))[:2] == (
        grpc.StatusCode.ALREADY_EXISTS,
        "DEPLOYMENT_EXISTS",
    )
    missing = pb.CreateDeploymentRequest(
        deployment=pb.Deployment(application="nope", environment="staging")
    )
    assert (await fails(iaops.CreateDeployment(missing, metadata=bob)))[
        0
    ] == grpc.StatusCode.NOT_FOUND


def cosign_signature(key: ec.EllipticCurvePrivateKey, digest: str) -> pb.SimpleSignature:
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": "ghcr.io/autoecoops/web"},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()
    return pb.SimpleSignature(
        payload=payload,
        signature=base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode(),
    )


async def test_verify_artifact_gates_on_signature_and_sbom_scan(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    iaops, _, _, audit, bus = stubs(mesh)
    md = bearer(mint_token("alice", ["admin"]))
    osv_dir = tmp_path / "osv"
    osv_dir.mkdir()
    (osv_dir / "GHSA-crit.json").write_text(
        json.dumps(
            {
                "schema_version": "1.6.0",
                "id": "GHSA-crit-0000-0000",
                "modified": "2024-01-01T00:00:00Z",
                "database_specific": {"severity": "CRITICAL"},
                "affected": [
                    {
                        "package": {"ecosystem": "PyPI", "name": "requests"},
                        "ranges": [
                            {
                                "type": "ECOSYSTEM",
                                "events": [{"introduced": "0"}, {"fixed": "2.32.0"}],
                            }
                        ],
                    }
                ],
            }
        )
    )
    key = ec.generate_private_key(ec.SECP256R1())
    pub = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    digest = "sha256:" + hashlib.sha256(b"manifest").hexdigest()
    sbom_doc = json.dumps(
        {
            "bomFormat": "CycloneDX",
            "specVersion": "1.6",
            "components": [
                {
                    "type": "library",
                    "name": "requests",
                    "version": "2.31.0",
                    "purl": "pkg:pypi/requests@2.31.0",
                }
            ],
        }
    ).encode()

    scan = await iaops.ScanSbom(pb.ScanSbomRequest(document=sbom_doc), metadata=md)
    assert scan.format == pb.SBOM_FORMAT_CYCLONEDX_JSON and scan.osv_record_count == 1
    assert [(v.id, v.severity, list(v.fixed_versions)) for v in scan.vulnerabilities] == [
        ("GHSA-crit-0000-0000", 5, ["2.32.0"])
    ]
    assert (await fails(iaops.ScanSbom(pb.ScanSbomRequest(document=b"{}"), metadata=md)))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_SBOM_FORMAT",
    )

    request = pb.VerifyArtifactRequest(
        artifact_ref="ghcr.io/autoecoops/web:1.0.0",
        digest=digest,
        public_key=pub,
        signatures=[cosign_signature(key, digest)],
        request_id="verify-1",
    )
    clean = await iaops.VerifyArtifact(request, metadata=md)
    assert clean.verified and clean.gate.allowed and clean.gate.decision_id
    assert clean.signer.algorithm == "ecdsa-p256"
    assert await iaops.VerifyArtifact(request, metadata=md) == clean  # same request_id, same answer

    vulnerable = await iaops.VerifyArtifact(
        pb.VerifyArtifactRequest(
            artifact_ref="ghcr.io/autoecoops/web:1.0.0",
            digest=digest,
            public_key=pub,
            signatures=[cosign_signature(key, digest)],
            sbom=sbom_doc,
        ),
        metadata=md,
    )
    assert vulnerable.verified and not vulnerable.gate.allowed
    assert vulnerable.gate.reasons == [
        "pkg:pypi/requests@2.31.0: CRITICAL vulnerability GHSA-crit-0000-0000, fixed in 2.32.0"
    ]

    other = ec.generate_private_key(ec.SECP256R1())
    forged = await iaops.VerifyArtifact(
        pb.VerifyArtifactRequest(
            artifact_ref="ghcr.io/autoecoops/web:1.0.0",
            digest=digest,
            public_key=pub,
            signatures=[cosign_signature(other, digest)],
        ),
        metadata=md,
    )
    assert not forged.verified and not forged.gate.allowed and not forged.HasField("signer")

    code, reason, _ = await fails(
        iaops.VerifyArtifact(
            pb.VerifyArtifactRequest(
                artifact_ref="ghcr.io/autoecoops/web:1.0.0", digest=digest, keyless=True
            ),
            metadata=md,
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEYLESS_NEEDS_NETWORK")

    env = await events_on(bus, md, "iaops.artifact", 3)
    verdicts = []
    for e in env:
        event = iaops_events.ArtifactVerified()
        e.data.Unpack(event)
        verdicts.append((event.verified, event.allowed, event.vulnerability_count))
    assert verdicts == [(True, True, 0), (True, False, 1), (False, False, 0)]
    entries = (
        await audit.ListEntries(
            audit_pb2.ListEntriesRequest(type="iaops.artifact.verified"), metadata=md
        )
    ).entries
    assert len(entries) == 3 and {e.resource for e in entries} == {
        "iaops/artifacts/ghcr.io/autoecoops/web:1.0.0"
    }
    assert {e.decision_id for e in entries} == {
        clean.gate.decision_id,
        vulnerable.gate.decision_id,
        forged.gate.decision_id,
    }
