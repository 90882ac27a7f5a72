"""Context from memory-hub: alerts and remediations carry the most relevant runbooks and
incident notes of a namespace, with citations (the seed's synchronous flow, step 3)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2 as M
from autoecoops.memory.v1 import memory_pb2_grpc
from tests.conftest import MintToken, StartMesh
from tests.integration.autoops.conftest import autoops, bearer
from tests.integration.memory_hub.conftest import model_path  # noqa: F401 - the shared model

SEED = """
roles:
  - {name: autoops-context, permissions: [memory.documents.search]}
bindings:
  - {name: autoops-context, role: autoops-context, subjects: [{kind: user, name: "system:mesh"}]}
"""


@pytest.fixture
async def mesh(
    start_mesh: StartMesh,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model_path: Path,  # noqa: F811
) -> Mesh:
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED)
    monkeypatch.setenv("AUTOECOOPS_AUTH_SEED_FILE", str(seed))
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_TICK_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_AUTOOPS_CONTEXT_NAMESPACE", "runbooks")
    return await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "memory-hub", "autoops"], secure=True
    )


async def test_alerts_and_remediations_cite_runbooks_from_memory_hub(
    mesh: Mesh, mint_token: MintToken
) -> None:
    md = bearer(mint_token("alice", ["admin"]))
    mem = memory_pb2_grpc.MemoryServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("memory-hub"))
    )
    await mem.CreateNamespace(
        M.CreateNamespaceRequest(namespace=M.Namespace(name="runbooks")), metadata=md
    )
    docs = [
        M.Document(
            id="checkout-errors",
            title="Checkout error budget burn",
            text="# Checkout error budget burn\n\nWhen checkout burns its error budget, roll back "
            "the last deploy of checkout with infra-manager and watch the 5xx rate.",
            content_type=M.CONTENT_TYPE_MARKDOWN,
        ),
        M.Document(
            id="disk-full",
            title="Disk full",
            text="# Disk full\n\nPrune container images with crictl rmi --prune.",
            content_type=M.CONTENT_TYPE_MARKDOWN,
        ),
    ]
    await mem.IngestDocuments(
        M.IngestDocumentsRequest(namespace="runbooks", documents=docs), metadata=md
    )

    stub = autoops(mesh)
    slo = pb.Slo(
        service="checkout",
        description="checkout error budget",
        objective=0.999,
        indicator=pb.Indicator(source=pb.SLI_SOURCE_PUSHED),
    )
    await stub.CreateSlo(pb.CreateSloRequest(slo_id="checkout", slo=slo), metadata=md)
    now = time.time()
    at = timestamp_pb2.Timestamp()
    at.FromNanoseconds(int((now - 60) * 1e9))
    await stub.RecordSli(
        pb.RecordSliRequest(
            slo="slos/checkout", samples=[pb.SliSample(good_count=50, total_count=100, time=at)]
        ),
        metadata=md,
    )
    fired = await stub.EvaluateSlos(pb.EvaluateSlosRequest(), metadata=md)
    alert = (
        await stub.GetAlert(pb.GetAlertRequest(name=fired.changed_alerts[0].name), metadata=md)
    ).alert
    assert alert.context, "the alert cites memory-hub documents"
    top = alert.context[0]
    assert top.document_id == "checkout-errors" and "roll back" in top.snippet and top.score > 0

    rb = pb.Runbook(
        description="checkout rollback",
        target="checkout",
        steps=[pb.RunbookStep(name="note", action=pb.STEP_ACTION_PUBLISH)],
        safeguards=pb.Safeguards(dry_run=True),
    )
    await stub.CreateRunbook(
        pb.CreateRunbookRequest(runbook_id="checkout", runbook=rb), metadata=md
    )
    rem = (
        await stub.RunRunbook(
            pb.RunRunbookRequest(name="runbooks/checkout", reason="checkout error budget burning"),
            metadata=md,
        )
    ).remediation
    assert rem.context and rem.context[0].document_id == "checkout-errors"
