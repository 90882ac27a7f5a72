"""Dogfood: infra-manager deploys this repository's own Helm chart into the embedded cluster.

`autoecoops up` as a user runs it; an Application whose source is this
repository (the checkout the tests run from, at HEAD) and its
k8s/helm/autoecoops chart, rendered by the real helm; every resource ends
Synced and Healthy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.infra.v1 import infra_pb2_grpc
from tests.e2e.conftest import RunningMesh, start_up, stop

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".build" / "tools"

pytestmark = pytest.mark.skipif(
    not (TOOLS / "helm").exists() or not (ROOT / ".git").exists(),
    reason="needs helm (./dev test installs it) and a Git checkout of this repository",
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    running = start_up(
        tmp_path_factory.mktemp("dogfood"),
        {"AUTOECOOPS_INFRA_MANAGER_HELM": str(TOOLS / "helm")},
    )
    yield running
    if running.proc.poll() is None:
        stop(running)


def test_the_projects_own_chart_syncs_into_the_embedded_cluster(mesh: RunningMesh) -> None:
    token = mesh.cli("token", "--subject", "alice", "--roles", "admin").strip()
    md = [("authorization", f"Bearer {token}")]
    with grpc.insecure_channel(mesh.addrs["infra-manager"]) as channel:
        stub = infra_pb2_grpc.InfraServiceStub(channel)
        app = pb.Application(
            name="autoecoops",
            source=pb.ApplicationSource(
                repo_url=str(ROOT), target_revision="HEAD", path="k8s/helm/autoecoops"
            ),
            destination=pb.ApplicationDestination(namespace="autoecops-core"),
        )
        stub.CreateApplication(pb.CreateApplicationRequest(application=app), metadata=md)

        rendered = stub.GetManifests(pb.GetManifestsRequest(name="autoecoops"), metadata=md)
        kinds = {m.resource.kind for m in rendered.manifests}
        assert {"Namespace", "Deployment", "Service", "NetworkPolicy", "ClusterRole"} <= kinds
        assert all(
            m.source_path.startswith("k8s/helm/autoecoops/templates/") for m in rendered.manifests
        )

        stub.SyncApplication(pb.SyncApplicationRequest(name="autoecoops"), metadata=md)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = stub.GetApplication(pb.GetApplicationRequest(name="autoecoops"), metadata=md)
            op = got.application.status.operation_state
            if op.phase not in (pb.OPERATION_PHASE_RUNNING, pb.OPERATION_PHASE_TERMINATING):
                break
            time.sleep(0.2)
        assert op.phase == pb.OPERATION_PHASE_SUCCEEDED, op.message
        assert len(op.resource_results) == len(rendered.manifests)

        fresh = stub.RefreshApplication(
            pb.RefreshApplicationRequest(name="autoecoops"), metadata=md
        ).application
        status = fresh.status
        assert status.sync.status == pb.SYNC_STATUS_CODE_SYNCED
        assert status.sync.revision == rendered.revision
        assert status.health.status == pb.HEALTH_STATUS_CODE_HEALTHY, status.health.message
        assert len(status.resources) == len(rendered.manifests)
        not_synced = [
            f"{r.resource.kind}/{r.resource.name}"
            for r in status.resources
            if r.status != pb.RESOURCE_SYNC_STATUS_SYNCED
        ]
        assert not_synced == []
        diff = stub.GetApplicationDiff(pb.GetApplicationDiffRequest(name="autoecoops"), metadata=md)
        assert all(not d.diff for d in diff.resource_diffs)
