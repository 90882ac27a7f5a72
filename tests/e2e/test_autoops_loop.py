"""The closed loop on the real mesh: a broken revision degrades an application, its SLO
burns, the page alert fires, the runbook rolls back through infra-manager, the
verification sees the SLO recover and the alert resolves; every step audited under one
trace id and on the bus.

The services run in this process (auth-service, policy-audit, event-bus, infra-manager,
autoops) on free ports with a real Redis and a real Git repository; the test plays the
Kubernetes controller that reports the broken rollout's ProgressDeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.common.v1 import types_pb2
from autoecoops.infra.v1 import infra_pb2, infra_pb2_grpc
from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster
from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import MintToken, StartMesh, base_key
from tests.integration.autoops.conftest import audit_entries, bearer, events
from tests.integration.infra_manager.conftest import deployment
from tests.integration.infra_manager.gitrepo import GitRepo

#: What the platform's own identity (system:mesh in one process) may do: the
#: remediation role an operator seeds for autoops (docs/autoops.md).
SEED = """
roles:
  - name: autoops-remediator
    permissions: [infra.applications.get, infra.applications.sync, infra.applications.rollback,
                  infra.history.list, infra.destinations.deploy, memory.documents.search]
bindings:
  - {name: autoops-remediates, role: autoops-remediator, subjects: [{kind: user, name: "system:mesh"}]}
"""


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    for key, value in {
        "AUTOECOOPS_AUTH_SEED_FILE": str(seed),
        "AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS": "0.3",
        "AUTOECOOPS_INFRA_MANAGER_RECONCILE_JITTER_SECONDS": "0",
        "AUTOECOOPS_INFRA_MANAGER_TICK_SECONDS": "0.1",
        "AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS": "0.05",
        "AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR": str(tmp_path / "cache"),
        "AUTOECOOPS_AUTOOPS_TICK_SECONDS": "0.5",
        "AUTOECOOPS_AUTOOPS_FINE_BUCKET_SECONDS": "1",
        "AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE": "off",
        "AUTOECOOPS_AUTOOPS_VERIFY_POLL_SECONDS": "0.3",
    }.items():
        monkeypatch.setenv(key, value)
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "infra-manager", "autoops"], secure=True
    )


def dur(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


async def wait_for(what: str, check: object, within: float = 60.0) -> object:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = await check()  # type: ignore[operator]
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_broken_revision_burns_the_slo_and_the_runbook_rolls_it_back(
    mesh: Mesh, mint_token: MintToken, tmp_path: Path
) -> None:
    md = bearer(mint_token("alice", ["admin"]))
    infra = infra_pb2_grpc.InfraServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("infra-manager"))
    )
    ops = autoops_pb2_grpc.AutoOpsServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("autoops"))
    )
    cluster = EmbeddedCluster(
        connect(mesh.config.redis_url),
        base_key(mesh.config.redis_url, mesh.config.key_prefix, "infra-manager") + ":cluster",
    )

    # 1. The application, synced and Healthy at a good revision.
    repo = GitRepo(tmp_path / "repo")
    good = repo.commit({"deploy/app.yaml": deployment("web", image="web:1.0")})
    app = infra_pb2.Application(
        name="web",
        source=infra_pb2.ApplicationSource(
            repo_url=repo.url, target_revision="main", path="deploy"
        ),
        destination=infra_pb2.ApplicationDestination(namespace="shop"),
    )
    await infra.CreateApplication(infra_pb2.CreateApplicationRequest(application=app), metadata=md)
    await infra.SyncApplication(infra_pb2.SyncApplicationRequest(name="web"), metadata=md)

    async def health() -> int:
        got = await infra.GetApplication(infra_pb2.GetApplicationRequest(name="web"), metadata=md)
        st = got.application.status
        if st.operation_state.phase == infra_pb2.OPERATION_PHASE_RUNNING:
            return 0
        return int(st.health.status)

    await wait_for("web Healthy", lambda: _is(health, infra_pb2.HEALTH_STATUS_CODE_HEALTHY))

    # 2. Its SLO (a health probe each tick) with a fast page row, and the runbook.
    slo = pb.Slo(
        service="web",
        objective=0.9,
        labels={"application": "web", "environment": "staging"},
        indicator=pb.Indicator(source=pb.SLI_SOURCE_APPLICATION_HEALTH, application="web"),
        time_window=pb.TimeWindow(rolling=dur(3600)),
        alert_policy=pb.AlertPolicy(
            windows=[
                pb.BurnRateWindow(
                    long_window=dur(30),
                    short_window=dur(5),
                    burn_rate=5,
                    severity=types_pb2.SEVERITY_CRITICAL,
                )
            ]
        ),
    )
    await ops.CreateSlo(pb.CreateSloRequest(slo_id="web-health", slo=slo), metadata=md)
    runbook = pb.Runbook(
        description="roll web back when its health SLO pages",
        trigger=pb.RunbookTrigger(
            slo_alert=pb.SloAlertTrigger(
                slo="slos/web-health", min_severity=types_pb2.SEVERITY_CRITICAL
            )
        ),
        target="web",
        steps=[
            pb.RunbookStep(
                name="rollback",
                action=pb.STEP_ACTION_ROLLBACK,
                verification=pb.Verification(slo_recovered="slos/web-health", timeout=dur(60)),
            )
        ],
    )
    await ops.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="rollback-web", runbook=runbook), metadata=md
    )
    await asyncio.sleep(3)  # a few healthy probes

    # 3. A broken revision: it syncs, then its rollout never becomes available.
    broken = repo.commit({"deploy/app.yaml": deployment("web", image="web:broken")})
    await infra.SyncApplication(infra_pb2.SyncApplicationRequest(name="web"), metadata=md)

    async def synced_broken() -> bool:
        got = await infra.GetApplication(infra_pb2.GetApplicationRequest(name="web"), metadata=md)
        op = got.application.status.operation_state
        return op.revision == broken and op.phase == infra_pb2.OPERATION_PHASE_SUCCEEDED

    await wait_for("the broken revision synced", synced_broken)
    ref = Ref("apps", "v1", "Deployment", "shop", "web")
    live = await cluster.get(ref)
    assert live is not None
    await cluster.set_status(
        ref,
        {
            "observedGeneration": live["metadata"]["generation"],
            "replicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 0,
            "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ],
        },
    )
    await wait_for("web Degraded", lambda: _is(health, infra_pb2.HEALTH_STATUS_CODE_DEGRADED))

    # 4. The SLO burns, the page fires, and the runbook starts by itself.
    async def paging() -> list[pb.Alert]:
        got = await ops.ListAlerts(pb.ListAlertsRequest(slo="slos/web-health"), metadata=md)
        return [a for a in got.alerts if a.alert_name == "WebHealthPageAlert"]

    (alert,) = await wait_for("the page alert", paging)  # type: ignore[misc]

    async def remediation() -> pb.Remediation | None:
        got = await ops.ListRemediations(
            pb.ListRemediationsRequest(runbook="runbooks/rollback-web"), metadata=md
        )
        ended = [
            r
            for r in got.remediations
            if r.state in (pb.REMEDIATION_STATE_SUCCEEDED, pb.REMEDIATION_STATE_FAILED)
        ]
        return ended[0] if ended else None

    rem = await wait_for("the remediation to end", remediation, within=90)
    assert isinstance(rem, pb.Remediation)
    assert rem.state == pb.REMEDIATION_STATE_SUCCEEDED, rem.message
    assert rem.alert == alert.name and rem.initiated_by == "automated"
    assert "recovered" in rem.step_results[0].message

    # 5. infra-manager rolled back to the good revision; the app is Healthy; the alert resolved.
    got = await infra.GetApplication(infra_pb2.GetApplicationRequest(name="web"), metadata=md)
    op = got.application.status.operation_state
    assert op.rollback_history_id == 1 and op.revision == good
    assert got.application.status.health.status == infra_pb2.HEALTH_STATUS_CODE_HEALTHY
    resolved = (await ops.GetAlert(pb.GetAlertRequest(name=alert.name), metadata=md)).alert
    assert resolved.state == pb.ALERT_STATE_RESOLVED

    # 6. One trace from the alert to infra-manager's rollback, all in the trail.
    trail = await audit_entries(mesh, md) + await audit_entries(mesh, md, "rpc")
    trace_id = alert.trace_id
    assert trace_id and rem.trace_id == trace_id
    in_trace = [e for e in trail if e.trace_id == trace_id]
    actions = [e.action for e in in_trace]
    assert "autoops.alert.fire" in actions
    assert {
        "autoops.remediation.decide",
        "autoops.remediation.create",
        "autoops.remediation.step",
        "autoops.remediation.complete",
    } <= set(actions)
    rollback = [
        e for e in trail if e.action == "autoecoops.infra.v1.InfraService.RollbackApplication"
    ]
    assert [(e.trace_id, e.actor.subject, e.resource) for e in rollback] == [
        (trace_id, "system:mesh", "web")
    ]
    # ...and on the bus.
    slo_events = [e.type for e in await events(mesh, md, "autoops.slo", want=2)]
    assert slo_events == ["autoecoops.autoops.slo.breached", "autoecoops.autoops.slo.resolved"]
    rem_events = [e.type for e in await events(mesh, md, "autoops.remediation", want=2)]
    assert rem_events == [
        "autoecoops.autoops.remediation.started",
        "autoecoops.autoops.remediation.completed",
    ]
    await cluster.redis.aclose()


async def _is(read: object, want: int) -> bool:
    return bool(await read() == want)  # type: ignore[operator]
