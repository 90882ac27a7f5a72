"""Failed controls cite memory-hub documents about them (the seed's synchronous flow,
"memory-hub context"); memory-hub down or the namespace missing never fails an evaluation."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from autoecoops.events.v1 import events_pb2, events_pb2_grpc
from autoecoops.kernel.mesh.context import LOOKUPS
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.machineops.v1 import events_pb2 as mo_events
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.memory.v1 import memory_pb2 as M
from autoecoops.memory.v1 import memory_pb2_grpc
from tests.conftest import StartMesh
from tests.integration.machine_ops.conftest import SERVICES, enroll_token, stub
from tests.integration.memory_hub.conftest import model_path  # noqa: F401 - the shared model

DOCS = [
    M.Document(
        id="motd-banner",
        title="Message of the day banner (CIS 1.7.1)",
        text="# Message of the day banner\n\nCIS 1.7.1: /etc/motd must carry the approved "
        "banner text. When the motd control fails, restore the banner from the golden image "
        "and check who edited the file.",
        content_type=M.CONTENT_TYPE_MARKDOWN,
    ),
    M.Document(
        id="disk-full",
        title="Disk full",
        text="# Disk full\n\nPrune container images with crictl rmi --prune.",
        content_type=M.CONTENT_TYPE_MARKDOWN,
    ),
]


def baseline(motd: Path, fine: Path) -> pb.Baseline:
    def control(cid: str, title: str, path: Path, tag: str) -> pb.Control:
        return pb.Control(
            id=cid,
            title=title,
            impact=0.7,
            tags=[tag],
            check=pb.Check(kind=pb.CHECK_KIND_FILE_CONTENT, key=str(path), expected="^ok$"),
        )

    return pb.Baseline(
        node_selector="zone=lab",
        controls=[
            control("motd-banner", "the message of the day carries the banner", motd, "cis:1.7.1"),
            control("fine-file", "a file that is fine", fine, "custom:1"),
        ],
    )


async def evaluate(mesh: Mesh, admin, start_agent, tmp_path: Path) -> pb.Evaluation:
    mo = stub(mesh)
    motd, fine = tmp_path / "motd", tmp_path / "fine"
    motd.write_text("tampered\n")
    fine.write_text("ok\n")
    await mo.CreateBaseline(
        pb.CreateBaselineRequest(baseline_id="lab", baseline=baseline(motd, fine)),
        metadata=admin,
    )
    secret = await enroll_token(mo, admin, "lab-1", {"zone": "lab"})
    await start_agent(mesh, "lab-1", secret, evaluate_interval=0, inventory_interval=0)
    req = pb.EvaluateNodeRequest(name="nodes/lab-1", baselines=["baselines/lab"])
    ev = (await mo.EvaluateNode(req, metadata=admin, timeout=60)).evaluation
    by_id = {r.control_id: r for r in ev.results}
    assert by_id["motd-banner"].status == pb.RESULT_STATUS_FAIL
    assert by_id["fine-file"].status == pb.RESULT_STATUS_PASS
    assert not by_id["fine-file"].context  # only failed controls are looked up
    return ev


def failures() -> float:
    return LOOKUPS.labels("machine-ops", "failed")._value.get()  # type: ignore[attr-defined]


async def test_failed_controls_cite_memory_hub_documents(
    start_mesh: StartMesh,
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,  # noqa: F811
    admin,
    start_agent,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_CONTEXT_NAMESPACE", "node-runbooks")
    # No seed binding: machine-ops's own role (machineops-service) may search.
    mesh = await start_mesh([*SERVICES, "memory-hub"], secure=True)
    mem = memory_pb2_grpc.MemoryServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("memory-hub"))
    )
    await mem.CreateNamespace(
        M.CreateNamespaceRequest(namespace=M.Namespace(name="node-runbooks")), metadata=admin
    )
    await mem.IngestDocuments(
        M.IngestDocumentsRequest(namespace="node-runbooks", documents=DOCS), metadata=admin
    )
    before = failures()

    ev = await evaluate(mesh, admin, start_agent, tmp_path)
    failed = next(r for r in ev.results if r.control_id == "motd-banner")
    assert failed.context, "the failed control cites nothing"
    top = failed.context[0]
    assert (top.document_id, top.namespace) == ("motd-banner", "node-runbooks")
    assert top.title.startswith("Message of the day") and top.score > 0
    assert len({c.document_id for c in failed.context}) == len(failed.context)
    assert failures() == before

    # The stored evaluation and the BaselineViolated event carry the same citations.
    listed = (
        await stub(mesh).ListEvaluations(
            pb.ListEvaluationsRequest(parent="nodes/lab-1"), metadata=admin
        )
    ).evaluations
    stored = next(r for r in listed[0].results if r.control_id == "motd-banner")
    assert list(stored.context) == list(failed.context)
    bus = events_pb2_grpc.EventBusServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("event-bus"))
    )
    call = bus.Subscribe(
        events_pb2.SubscribeRequest(
            topic="machineops.compliance",
            group="t",
            consumer="c",
            start_position=events_pb2.START_POSITION_EARLIEST,
        ),
        metadata=admin,
    )
    async for reply in call:
        if reply.delivery.envelope.type == "autoecoops.machineops.baseline.violated":
            violated = mo_events.BaselineViolated()
            reply.delivery.envelope.data.Unpack(violated)
            break
    call.cancel()
    assert [r.control_id for r in violated.failed] == ["motd-banner"]
    assert list(violated.failed[0].context) == list(failed.context)


@pytest.mark.parametrize("memory_hub", [True, False], ids=["namespace-missing", "hub-down"])
async def test_no_context_degrades_never_fails_the_evaluation(
    start_mesh: StartMesh,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    admin,
    start_agent,
    tmp_path: Path,
    memory_hub: bool,
) -> None:
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("AUTOECOOPS_MACHINEOPS_CONTEXT_NAMESPACE", "no-such-namespace")
    if memory_hub:
        request.getfixturevalue("model_path")
    mesh = await start_mesh([*SERVICES, *(["memory-hub"] if memory_hub else [])], secure=True)
    before = failures()
    ev = await evaluate(mesh, admin, start_agent, tmp_path)
    assert ev.failed == 1 and all(not r.context for r in ev.results)
    assert failures() == before + 1  # logged and counted
