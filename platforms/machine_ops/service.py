"""Platform-03 MachineNativeOps's gRPC edge: translates proto <-> fleet calls, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import json_format, struct_pb2

from autoecoops.kernel.auth.mesh import own_clients
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.context import MemoryContext
from autoecoops.kernel.mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc
from autoecoops.platforms.machine_ops.events import BusPublisher, NodeIdentities
from autoecoops.platforms.machine_ops.fleet import Fleet
from autoecoops.platforms.machine_ops.sessions import SessionHub
from autoecoops.platforms.machine_ops.settings import MachineOpsSettings
from autoecoops.platforms.machine_ops.store import MachineStore
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger("autoecoops.machine_ops")
Ctx: TypeAlias = grpc.aio.ServicerContext
#: The policy-audit decision that gates a remediation.
REMEDIATION_POLICY = "autoecoops/machineops/remediation/allow"


def _timeout(req_timeout: Any, has: bool, default: float, maximum: float, field: str) -> float:
    if not has:
        return default
    value = float(req_timeout.ToNanoseconds()) / 1e9
    if not 0 < value <= maximum:
        raise InvalidArgument(
            f"{field} must be positive and at most {maximum:g}s",
            field_violations=[FieldViolation(field, f"between 0 and {maximum:g}s")],
        )
    return value


class MachineOpsServicer(machineops_pb2_grpc.MachineOpsServiceServicer):
    """Serves autoecoops.machineops.v1.MachineOpsService."""

    def __init__(self, fleet: Fleet, hub: SessionHub, runtime: Runtime) -> None:
        self.fleet = fleet
        self.hub = hub
        self.runtime = runtime
        # Agent messages handled at once across every session: a thousand
        # agents reconnecting together queue here, not in the Redis pool
        # (shared with the rest of the service, and failing when exhausted).
        self._gate = asyncio.Semaphore(fleet.settings.max_inflight)

    # -- baselines ---------------------------------------------------------------

    async def CreateBaseline(
        self, request: pb.CreateBaselineRequest, context: Ctx
    ) -> pb.CreateBaselineResponse:
        """Create a baseline (a retry with the same request_id returns the first result)."""
        if hit := await self.fleet.replayed(
            "CreateBaseline", request.request_id, pb.CreateBaselineResponse
        ):
            return hit  # type: ignore[no-any-return]
        reply = pb.CreateBaselineResponse(
            baseline=await self.fleet.create_baseline(request.baseline_id, request.baseline)
        )
        await self.fleet.store.remember("CreateBaseline", request.request_id, reply)
        return reply

    async def ImportBaseline(
        self, request: pb.ImportBaselineRequest, context: Ctx
    ) -> pb.ImportBaselineResponse:
        """Create or replace a baseline from InSpec-style YAML."""
        if hit := await self.fleet.replayed(
            "ImportBaseline", request.request_id, pb.ImportBaselineResponse
        ):
            return hit  # type: ignore[no-any-return]
        reply = pb.ImportBaselineResponse(
            baseline=await self.fleet.import_baseline(request.baseline_id, request.yaml)
        )
        await self.fleet.store.remember("ImportBaseline", request.request_id, reply)
        return reply

    async def GetBaseline(
        self, request: pb.GetBaselineRequest, context: Ctx
    ) -> pb.GetBaselineResponse:
        """Get a baseline."""
        return pb.GetBaselineResponse(baseline=await self.fleet.get_baseline(request.name))

    async def ListBaselines(
        self, request: pb.ListBaselinesRequest, context: Ctx
    ) -> pb.ListBaselinesResponse:
        """List baselines."""
        items, nxt = await self.fleet.list_baselines(request.page_size, request.page_token)
        return pb.ListBaselinesResponse(baselines=items, next_page_token=nxt)

    async def UpdateBaseline(
        self, request: pb.UpdateBaselineRequest, context: Ctx
    ) -> pb.UpdateBaselineResponse:
        """Update a baseline."""
        b = await self.fleet.update_baseline(request.baseline, list(request.update_mask.paths))
        return pb.UpdateBaselineResponse(baseline=b)

    async def DeleteBaseline(
        self, request: pb.DeleteBaselineRequest, context: Ctx
    ) -> pb.DeleteBaselineResponse:
        """Delete a baseline."""
        await self.fleet.delete_baseline(request.name, request.etag)
        return pb.DeleteBaselineResponse()

    # -- enrollment -----------------------------------------------------------------

    async def CreateEnrollmentToken(
        self, request: pb.CreateEnrollmentTokenRequest, context: Ctx
    ) -> pb.CreateEnrollmentTokenResponse:
        """Create a one-time enrollment token."""
        rpc = "CreateEnrollmentToken"
        if hit := await self.fleet.replayed(
            rpc, request.request_id, pb.CreateEnrollmentTokenResponse
        ):
            return hit  # type: ignore[no-any-return]
        token, secret = await self.fleet.create_enrollment_token(
            request.enrollment_token_id, request.enrollment_token
        )
        reply = pb.CreateEnrollmentTokenResponse(enrollment_token=token, secret=secret)
        await self.fleet.store.remember(rpc, request.request_id, reply)
        return reply

    async def ListEnrollmentTokens(
        self, request: pb.ListEnrollmentTokensRequest, context: Ctx
    ) -> pb.ListEnrollmentTokensResponse:
        """List enrollment tokens."""
        items, nxt = await self.fleet.list_enrollment_tokens(request.page_size, request.page_token)
        return pb.ListEnrollmentTokensResponse(enrollment_tokens=items, next_page_token=nxt)

    async def RevokeEnrollmentToken(
        self, request: pb.RevokeEnrollmentTokenRequest, context: Ctx
    ) -> pb.RevokeEnrollmentTokenResponse:
        """Revoke an enrollment token."""
        return pb.RevokeEnrollmentTokenResponse(
            enrollment_token=await self.fleet.revoke_enrollment_token(request.name)
        )

    async def EnrollAgent(
        self, request: pb.EnrollAgentRequest, context: Ctx
    ) -> pb.EnrollAgentResponse:
        """Spend an enrollment secret for a node identity."""
        if request.request_id:
            # Keyed by the secret's token too, so a request id cannot replay someone else's credentials.
            key = f"{request.secret.split('.', 1)[0]}:{request.request_id}"
            if hit := await self.fleet.replayed("EnrollAgent", key, pb.EnrollAgentResponse):
                return hit  # type: ignore[no-any-return]
        node, client_id, secret = await self.fleet.enroll(
            request.node_id, request.secret, request.agent_version
        )
        reply = pb.EnrollAgentResponse(node=node, client_id=client_id, client_secret=secret)
        if request.request_id:
            await self.fleet.store.remember("EnrollAgent", key, reply)
        return reply

    # -- nodes ---------------------------------------------------------------------------

    async def GetNode(self, request: pb.GetNodeRequest, context: Ctx) -> pb.GetNodeResponse:
        """Get a node."""
        return pb.GetNodeResponse(node=await self.fleet.get_node(request.name))

    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        """List nodes."""
        items, nxt = await self.fleet.list_nodes(
            request.page_size, request.page_token, request.label_selector
        )
        return pb.ListNodesResponse(nodes=items, next_page_token=nxt)

    async def UpdateNode(
        self, request: pb.UpdateNodeRequest, context: Ctx
    ) -> pb.UpdateNodeResponse:
        """Update a node's labels."""
        return pb.UpdateNodeResponse(
            node=await self.fleet.update_node(request.node, list(request.update_mask.paths))
        )

    async def DeleteNode(
        self, request: pb.DeleteNodeRequest, context: Ctx
    ) -> pb.DeleteNodeResponse:
        """Delete a node and its identity."""
        await self.fleet.delete_node(request.name, request.etag)
        return pb.DeleteNodeResponse()

    async def EvaluateNode(
        self, request: pb.EvaluateNodeRequest, context: Ctx
    ) -> pb.EvaluateNodeResponse:
        """Evaluate a node now through its agent, on whichever replica holds it."""
        if hit := await self.fleet.replayed(
            "EvaluateNode", request.request_id, pb.EvaluateNodeResponse
        ):
            return hit  # type: ignore[no-any-return]
        node = await self.fleet.node_record(request.name)
        s = self.fleet.settings
        timeout = _timeout(
            request.timeout,
            request.HasField("timeout"),
            s.evaluate_timeout,
            s.max_evaluate_timeout,
            "timeout",
        )
        baselines = await self.fleet.baselines_for(dict(node.labels), list(request.baselines))
        if not baselines:
            raise FailedPrecondition(f"no baseline applies to {node.name}", reason="NO_BASELINE")
        command = pb.Command(
            id=f"evaluate-{request.request_id or uuid.uuid4().hex}",
            evaluate=pb.EvaluateCommand(baselines=baselines, control_ids=list(request.control_ids)),
        )
        command.timeout.FromNanoseconds(int(timeout * 1e9))
        answer = await self.hub.send(node.name.split("/", 1)[1], command, timeout)
        evaluation = await self._evaluation(node.name, answer.get("evaluation", ""))
        reply = pb.EvaluateNodeResponse(evaluation=evaluation)
        await self.fleet.store.remember("EvaluateNode", request.request_id, reply)
        return reply

    async def _evaluation(self, node: str, name: str) -> pb.Evaluation:
        for e in await self.fleet.store.evaluations(node.split("/", 1)[1], 50):
            if e.name == name:
                return e
        raise NotFound(
            f"evaluation {name} was not recorded", resource_type="Evaluation", resource_name=name
        )

    async def RemediateNode(
        self, request: pb.RemediateNodeRequest, context: Ctx
    ) -> pb.RemediateNodeResponse:
        """Remediate one control on a node when the control allows it and policy-audit says yes."""
        if hit := await self.fleet.replayed(
            "RemediateNode", request.request_id, pb.RemediateNodeResponse
        ):
            return hit  # type: ignore[no-any-return]
        node = await self.fleet.node_record(request.name)
        baseline = await self.fleet.get_baseline(request.baseline, "baseline")
        control = next((c for c in baseline.controls if c.id == request.control_id), None)
        if control is None:
            raise NotFound(
                f"{baseline.name} has no control {request.control_id}",
                resource_type="Control",
                resource_name=request.control_id,
            )
        if not control.remediable:
            raise FailedPrecondition(
                f"control {control.id} does not allow remediation", reason="NOT_REMEDIABLE"
            )
        decision = await self._decide(node, baseline, control, request.dry_run)
        s = self.fleet.settings
        timeout = _timeout(
            request.timeout,
            request.HasField("timeout"),
            s.evaluate_timeout,
            s.max_evaluate_timeout,
            "timeout",
        )
        command = pb.Command(
            id=f"remediate-{request.request_id or uuid.uuid4().hex}",
            remediate=pb.RemediateCommand(
                baseline=baseline.name, control=control, dry_run=request.dry_run
            ),
        )
        command.timeout.FromNanoseconds(int(timeout * 1e9))
        answer = await self.hub.send(node.name.split("/", 1)[1], command, timeout)
        result = pb.CommandResult()
        json_format.ParseDict(answer.get("result", {}), result)
        reply = pb.RemediateNodeResponse(result=result, decision_id=decision)
        await self.fleet.store.remember("RemediateNode", request.request_id, reply)
        return reply

    async def _decide(
        self, node: pb.Node, baseline: pb.Baseline, control: pb.Control, dry_run: bool
    ) -> str:
        stub = self.runtime.clients.stub(policy_pb2_grpc.PolicyServiceStub, "policy-audit")
        doc = struct_pb2.Value()
        json_format.ParseDict(
            {
                "node": {"name": node.name, "labels": dict(node.labels)},
                "baseline": baseline.name,
                "control": {
                    "id": control.id,
                    "kind": pb.CheckKind.Name(control.check.kind),
                    "key": control.check.key,
                    "expected": control.check.expected,
                    "remediable": control.remediable,
                },
                "dry_run": dry_run,
            },
            doc,
        )
        try:
            reply = await stub.Evaluate(
                policy_pb2.EvaluateRequest(path=REMEDIATION_POLICY, input=doc), timeout=10.0
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        if not (reply.defined and reply.result.bool_value):
            raise PermissionDenied(
                f"policy {REMEDIATION_POLICY} does not allow remediating {control.id} on {node.name}",
                reason="POLICY_DENIED",
                metadata={"decision_id": reply.decision_id},
            )
        return str(reply.decision_id)

    # -- results -------------------------------------------------------------------------

    async def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: Ctx
    ) -> pb.ListEvaluationsResponse:
        """List a node's evaluations."""
        items, nxt = await self.fleet.list_evaluations(
            request.parent, request.page_size, request.page_token
        )
        return pb.ListEvaluationsResponse(evaluations=items, next_page_token=nxt)

    async def GetGroupCompliance(
        self, request: pb.GetGroupComplianceRequest, context: Ctx
    ) -> pb.GetGroupComplianceResponse:
        """Compliance of a group of nodes."""
        return await self.fleet.group_compliance(request.label_selector)

    async def ExportPolicyReport(
        self, request: pb.ExportPolicyReportRequest, context: Ctx
    ) -> pb.ExportPolicyReportResponse:
        """A node's latest results as a PolicyReport."""
        report = struct_pb2.Struct()
        report.update(await self.fleet.policy_report(request.name))
        return pb.ExportPolicyReportResponse(report=report)

    async def GetInventory(
        self, request: pb.GetInventoryRequest, context: Ctx
    ) -> pb.GetInventoryResponse:
        """A node's inventory."""
        return pb.GetInventoryResponse(
            inventory=await self.fleet.inventory_of(request.name, list(request.tables))
        )

    async def RefreshInventory(
        self, request: pb.RefreshInventoryRequest, context: Ctx
    ) -> pb.RefreshInventoryResponse:
        """Have the agent send its full inventory now; return it as stored."""
        if not request.name.endswith("/inventory"):
            raise InvalidArgument(
                "name must be nodes/{node}/inventory",
                field_violations=[FieldViolation("name", "must be nodes/{node}/inventory")],
            )
        node = await self.fleet.node_record(request.name.removesuffix("/inventory"))
        s = self.fleet.settings
        timeout = _timeout(
            request.timeout,
            request.HasField("timeout"),
            s.evaluate_timeout,
            s.max_evaluate_timeout,
            "timeout",
        )
        command = pb.Command(
            id=f"inventory-{uuid.uuid4().hex}", collect_inventory=pb.CollectInventoryCommand()
        )
        command.timeout.FromNanoseconds(int(timeout * 1e9))
        # The agent queues the inventory before its command result, and the
        # session applies messages in order: once the result is here, so is it.
        answer = await self.hub.send(node.name.split("/", 1)[1], command, timeout)
        result = pb.CommandResult()
        json_format.ParseDict(answer.get("result", {}), result)
        if result.status != pb.COMMAND_STATUS_SUCCEEDED:
            raise FailedPrecondition(
                f"the agent could not collect inventory: {result.message}", reason="AGENT_FAILED"
            )
        return pb.RefreshInventoryResponse(
            inventory=await self.fleet.inventory_of(request.name, [])
        )

    async def ListInventoryChanges(
        self, request: pb.ListInventoryChangesRequest, context: Ctx
    ) -> pb.ListInventoryChangesResponse:
        """A node's inventory history."""
        items, nxt = await self.fleet.inventory_changes(
            request.parent, request.page_size, request.page_token
        )
        return pb.ListInventoryChangesResponse(changes=items, next_page_token=nxt)

    async def SearchNodes(
        self, request: pb.SearchNodesRequest, context: Ctx
    ) -> pb.SearchNodesResponse:
        """Search the fleet's inventory."""
        items, nxt = await self.fleet.list_nodes(
            request.page_size, request.page_token, request.label_selector, request.filter
        )
        return pb.SearchNodesResponse(nodes=items, next_page_token=nxt)

    # -- the agent session ------------------------------------------------------------------

    async def AgentSession(
        self, request_iterator: AsyncIterator[pb.AgentSessionRequest], context: Ctx
    ) -> AsyncIterator[pb.AgentSessionResponse]:
        """Hello, then sequenced messages each applied once and acked; commands flow back."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                "the first message of a session must be hello", reason="HELLO_REQUIRED"
            )
        async with self._gate:
            node, welcome = await self.fleet.open_session(current_principal.get(), first.hello)
        node_id = node.name.split("/", 1)[1]
        session = await self.hub.attach(node_id, first.hello.epoch)
        reader = asyncio.create_task(
            self._read(request_iterator, session.outbox, node_id, first.hello.epoch)
        )
        # A session never outlives the token it was opened with: at its expiry
        # the stream ends UNAUTHENTICATED and the agent reconnects with a
        # fresh token from auth-service, so node tokens really rotate.
        expired = asyncio.Event()
        principal = current_principal.get()
        exp = float((principal.claims if principal else {}).get("exp", 0) or 0)

        def expire() -> None:
            expired.set()
            session.outbox.put_nowait(None)

        timer = (
            asyncio.get_running_loop().call_later(max(0.0, exp - time.time()), expire)
            if exp
            else None
        )
        try:
            yield pb.AgentSessionResponse(welcome=welcome)
            while True:
                item = await session.outbox.get()
                if item is None:
                    break
                yield item
            if expired.is_set():
                raise Unauthenticated(
                    "the session's token expired; reconnect with a fresh one",
                    reason="TOKEN_EXPIRED",
                )
        finally:
            if timer is not None:
                timer.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self.hub.detach(session)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]

    async def _read(
        self,
        requests: AsyncIterator[pb.AgentSessionRequest],
        outbox: asyncio.Queue[pb.AgentSessionResponse | None],
        node_id: str,
        epoch: str,
    ) -> None:
        try:
            async for msg in requests:
                if msg.WhichOneof("message") == "heartbeat":
                    self.hub.heard(node_id)
                    continue
                async with self._gate:
                    await self._handle(msg, outbox, node_id, epoch)
        finally:
            outbox.put_nowait(None)

    async def _handle(
        self,
        msg: pb.AgentSessionRequest,
        outbox: asyncio.Queue[pb.AgentSessionResponse | None],
        node_id: str,
        epoch: str,
    ) -> None:
        kind = msg.WhichOneof("message")
        if kind in ("hello", "heartbeat") or kind is None:
            return
        if msg.sequence <= 0:
            raise InvalidArgument(
                "messages other than hello and heartbeat need a positive sequence",
                reason="SEQUENCE_REQUIRED",
            )
        if await self.fleet.store.get("nodes", node_id, pb.Node) is None:
            raise Unavailable(f"nodes/{node_id} was deleted", reason="NODE_DELETED")
        if kind == "evaluation":
            applied, evaluation = await self.fleet.ingest_evaluation(
                node_id, epoch, msg.sequence, msg.evaluation
            )
            if msg.evaluation.command_id:
                # The name comes from the report's time and sequence, so a
                # resend names the evaluation stored the first time.
                await self.hub.reply(msg.evaluation.command_id, {"evaluation": evaluation.name})
        elif kind == "inventory":
            applied = await self.fleet.ingest_inventory(node_id, epoch, msg.sequence, msg.inventory)
        else:
            applied = await self.fleet.ingest_plain(node_id, epoch, msg.sequence)
            await self.hub.reply(
                msg.command_result.command_id,
                {
                    "result": json_format.MessageToDict(
                        msg.command_result, preserving_proto_field_name=True
                    )
                },
            )
        self.hub.heard(node_id)
        outbox.put_nowait(
            pb.AgentSessionResponse(ack=pb.Ack(sequence=msg.sequence, duplicate=not applied))
        )


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-03 MachineNativeOps's servicers to ``server``."""
    settings = MachineOpsSettings.from_env()
    store = MachineStore(runtime.redis, runtime.key("machine-ops"))
    # Node accounts and memory-hub searches need machine-ops's own role
    # (machineops-service), which the process-wide identity does not hold.
    clients = own_clients(runtime, "machine-ops")
    audit = runtime.auditor if hasattr(runtime.auditor, "record") else None
    fleet = Fleet(
        store,
        settings,
        identities=NodeIdentities(clients),
        publisher=BusPublisher(clients),
        audit=audit,  # type: ignore[arg-type]
        context=MemoryContext(
            clients, "machine-ops", timeout=3.0, attempts=2, cache_ttl=settings.context_cache
        ),
    )
    hub = SessionHub(store)
    runtime.starters.append(fleet.seed)
    runtime.starters.append(hub.start)
    runtime.closers.append(hub.stop)
    machineops_pb2_grpc.add_MachineOpsServiceServicer_to_server(
        MachineOpsServicer(fleet, hub, runtime), server
    )
    return [pb.DESCRIPTOR.services_by_name["MachineOpsService"].full_name]
