"""The deployment flow: the seed's synchronous flow, end to end, through the kernel.

    validate the Application's manifests rendered by infra-manager at the revision
    -> policy-audit decision (who may deploy what where; production needs an approval)
    -> infra-manager sync -> wait for health -> the deployment's record
    (a failed sync or health check rolls back to the previous history entry)

Every step is an audit entry under the request's trace id; DeploymentRequested
and DeploymentCompleted go to the "iaops.deployment" topic. A request_id is
claimed before any work, so a retry returns the first deployment (AIP-155).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from autoecoops.common.v1 import types_pb2
from autoecoops.iaops.v1 import events_pb2 as ev
from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.infra.v1 import infra_pb2
from autoecoops.kernel.mesh.audit import FAILURE, SUCCESS, ServiceTrail
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, FieldViolation, InvalidArgument
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.platforms.iaops.peers import Decision, EventPeer, InfraPeer
from autoecoops.platforms.iaops.settings import IaOpsSettings
from autoecoops.platforms.iaops.store import IaOpsStore
from autoecoops.platforms.iaops.validation import Report

ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
RISKS = ("", "low", "medium", "high")
RESOURCE_TYPE = "iaops.autoecoops.io/Deployment"
log = logging.getLogger("autoecoops.iaops")

#: Renders and validates an application at a revision with a bundle's rules.
ValidateApp = Callable[[str, str, str], Awaitable[Report]]
#: Asks policy-audit for the deploy decision, as the caller.
Decide = Callable[[Mapping[str, Any], Principal | None], Awaitable[Decision]]
#: Converts a report to its proto form.
ReportPb = Callable[[Report], pb.ValidationReport]

HEALTHY = infra_pb2.HEALTH_STATUS_CODE_HEALTHY
BAD_HEALTH = (infra_pb2.HEALTH_STATUS_CODE_DEGRADED, infra_pb2.HEALTH_STATUS_CODE_MISSING)
DONE_PHASES = (
    infra_pb2.OPERATION_PHASE_SUCCEEDED,
    infra_pb2.OPERATION_PHASE_FAILED,
    infra_pb2.OPERATION_PHASE_ERROR,
)


def _phase_name(phase: int) -> str:
    return infra_pb2.OperationPhase.Name(phase)  # type: ignore[arg-type]


def _health_name(health: int) -> str:
    return infra_pb2.HealthStatusCode.Name(health)  # type: ignore[arg-type]


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def fingerprint(request: pb.CreateDeploymentRequest) -> str:
    """What makes two requests "the same" for a request_id: everything but the id."""
    copy = pb.CreateDeploymentRequest()
    copy.CopyFrom(request)
    copy.request_id = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:32]


def check_request(request: pb.CreateDeploymentRequest) -> None:
    """INVALID_ARGUMENT naming every bad field."""
    d = request.deployment
    bad: list[FieldViolation] = []
    if not request.HasField("deployment"):
        bad.append(FieldViolation("deployment", "required"))
    if not d.application:
        bad.append(
            FieldViolation("deployment.application", "required: an infra-manager Application")
        )
    if not d.environment:
        bad.append(FieldViolation("deployment.environment", "required, e.g. staging or production"))
    if d.risk not in RISKS:
        bad.append(FieldViolation("deployment.risk", "one of low, medium, high"))
    if request.deployment_id and not ID.match(request.deployment_id):
        bad.append(
            FieldViolation(
                "deployment_id", "lowercase letters, digits and '-', 1-63, starting with a letter"
            )
        )
    if d.name:
        bad.append(FieldViolation("deployment.name", "output only: set deployment_id instead"))
    if len(request.request_id) > 128:
        bad.append(FieldViolation("request_id", "at most 128 characters"))
    if bad:
        raise InvalidArgument(
            "invalid deployment: " + "; ".join(f"{v.field}: {v.description}" for v in bad),
            reason="INVALID_DEPLOYMENT",
            field_violations=bad,
        )


class DeploymentFlow:
    """Runs deployments and keeps their records."""

    def __init__(
        self,
        *,
        store: IaOpsStore,
        infra: InfraPeer,
        events: EventPeer,
        audit: ServiceTrail,
        validate: ValidateApp,
        decide: Decide,
        report_pb: ReportPb,
        settings: IaOpsSettings,
    ) -> None:
        self.store = store
        self.infra = infra
        self.events = events
        self.audit = audit
        self.validate = validate
        self.decide = decide
        self.report_pb = report_pb
        self.settings = settings

    async def create(
        self, request: pb.CreateDeploymentRequest, caller: Principal | None
    ) -> pb.Deployment:
        """Run the flow; a repeated request_id returns the first deployment."""
        check_request(request)
        name = f"deployments/{request.deployment_id or uuid.uuid4().hex[:16]}"
        if request.request_id:
            first = await self.store.claim(
                "deployment", request.request_id, fingerprint(request), name
            )
            if first is not None:
                return await self._wait_for(first)
        try:
            app = await self.infra.application(request.deployment.application)
        except AutoEcoOpsError:
            if request.request_id:
                await self.store.release("deployment", request.request_id)
            raise
        d = pb.Deployment()
        d.CopyFrom(request.deployment)
        d.name = name
        d.state = pb.DEPLOYMENT_STATE_VALIDATING
        d.target_namespace = app.destination.namespace
        d.requested_by = caller.subject if caller else ""
        d.trace_id = current_trace_id()
        d.create_time.CopyFrom(_now())
        d.update_time.CopyFrom(d.create_time)
        try:
            d = await self.store.create(d, time.time_ns())
        except AutoEcoOpsError:
            if request.request_id:
                await self.store.release("deployment", request.request_id)
            raise
        try:
            return await self._run(d, caller)
        except AutoEcoOpsError as err:
            # The record says what happened; the caller gets the error itself,
            # even when recording it fails too (e.g. the trail is down).
            try:
                await self._finish(d, pb.DEPLOYMENT_STATE_FAILED, f"{err.code.name}: {err.message}")
            except AutoEcoOpsError:
                log.exception("could not record the failure of %s", d.name)
            raise

    async def _wait_for(self, name: str) -> pb.Deployment:
        # A concurrent retry may arrive before the first call stored its record.
        for _ in range(100):
            try:
                return await self.store.get(name)
            except AutoEcoOpsError:
                await asyncio.sleep(0.05)
        return await self.store.get(name)

    async def _step(
        self,
        d: pb.Deployment,
        step: str,
        outcome: int = SUCCESS,
        decision_id: str = "",
        **details: Any,
    ) -> None:
        await self.audit.record(
            type=f"iaops.deployment.{step}",
            action=f"deployments.{step}",
            resource=f"iaops/{d.name}",
            outcome=outcome,
            decision_id=decision_id,
            details={"application": d.application, "environment": d.environment, **details},
        )

    def _condition(self, d: pb.Deployment, type_: str, ok: bool, reason: str, message: str) -> None:
        cond = types_pb2.Condition(
            type=type_,
            status=types_pb2.CONDITION_STATUS_TRUE if ok else types_pb2.CONDITION_STATUS_FALSE,
            reason=reason,
            message=message,
            severity=types_pb2.SEVERITY_INFO if ok else types_pb2.SEVERITY_HIGH,
        )
        cond.last_transition_time.CopyFrom(_now())
        d.conditions.append(cond)

    async def _run(self, d: pb.Deployment, caller: Principal | None) -> pb.Deployment:
        await self._step(d, "requested", revision=d.revision, dry_run=d.dry_run)
        requested = ev.DeploymentRequested(
            deployment=d.name,
            application=d.application,
            revision=d.revision,
            environment=d.environment,
            dry_run=d.dry_run,
            requested_by=d.requested_by,
        )
        requested.create_time.CopyFrom(d.create_time)
        await self.events.publish(
            requested, subject=d.name, resource=f"iaops/{d.name}", key=f"{d.name}/requested"
        )

        # 1. What will be deployed, rendered by infra-manager, validated here.
        report = await self.validate(d.application, d.revision, d.policy_bundle)
        d.validation.CopyFrom(self.report_pb(report))
        d.resolved_revision = report.revision
        ok = report.passed
        self._condition(
            d,
            "Validated",
            ok,
            "ValidationPassed" if ok else "ValidationFailed",
            f"{report.resource_count} resources: {report.failures} failures, {report.warnings} warnings",
        )
        await self._step(
            d,
            "validated",
            SUCCESS if ok else FAILURE,
            revision=report.revision,
            failures=report.failures,
            warnings=report.warnings,
        )
        if not ok:
            return await self._finish(
                d, pb.DEPLOYMENT_STATE_REJECTED, f"validation failed: {report.failures} failures"
            )

        # 2. Who may deploy what where (production needs an approval).
        decision = await self.decide(
            {
                "target": {"environment": d.environment, "namespace": d.target_namespace},
                "change": {
                    "author": d.requested_by,
                    "approvers": list(d.approvers),
                    "risk": d.risk or "low",
                    "kind": "Deployment",
                    "application": d.application,
                    "revision": d.resolved_revision,
                },
            },
            caller,
        )
        d.decision_id = decision.decision_id
        d.denial_reasons[:] = [] if decision.allow else list(decision.reasons)
        self._condition(
            d,
            "Allowed",
            decision.allow,
            "PolicyAllowed" if decision.allow else "PolicyDenied",
            "; ".join(decision.reasons) or ("allowed" if decision.allow else "denied"),
        )
        await self._step(
            d,
            "decided",
            SUCCESS if decision.allow else FAILURE,
            decision_id=decision.decision_id,
            allow=decision.allow,
            reasons=list(decision.reasons),
        )
        if not decision.allow:
            return await self._finish(
                d, pb.DEPLOYMENT_STATE_REJECTED, "denied by policy: " + "; ".join(decision.reasons)
            )
        if d.dry_run:
            return await self._finish(
                d, pb.DEPLOYMENT_STATE_SUCCEEDED, "dry run: validated and allowed; nothing applied"
            )

        # 3. Sync through infra-manager and wait for it to be healthy.
        d.state = pb.DEPLOYMENT_STATE_DEPLOYING
        await self.store.put(d)
        history = await self.infra.history(d.application)
        previous = history[0].id if history else None
        op = await self.infra.sync(d.application, d.resolved_revision or d.revision)
        d.sync_operation_id = op.id
        phase, health, why = await self._settle(d.application, op.id)
        synced = phase == infra_pb2.OPERATION_PHASE_SUCCEEDED
        self._condition(d, "Synced", synced, "SyncSucceeded" if synced else "SyncFailed", why)
        await self._step(
            d,
            "synced",
            SUCCESS if synced else FAILURE,
            operation=op.id,
            phase=_phase_name(phase),
        )
        healthy = synced and health == HEALTHY
        self._condition(
            d,
            "Healthy",
            healthy,
            "Healthy" if healthy else "Unhealthy",
            _health_name(health),
        )
        await self._step(
            d,
            "health",
            SUCCESS if healthy else FAILURE,
            health=_health_name(health),
        )
        if healthy:
            return await self._finish(
                d,
                pb.DEPLOYMENT_STATE_SUCCEEDED,
                f"{d.application} is healthy at {d.resolved_revision}",
            )

        # 4. Not healthy: back to what ran before, through infra-manager.
        if previous is None:
            return await self._finish(
                d, pb.DEPLOYMENT_STATE_FAILED, f"{why}; no earlier revision to roll back to"
            )
        back = await self.infra.rollback(d.application, previous)
        d.rollback_operation_id = back.id
        phase, health, rb_why = await self._settle(d.application, back.id)
        rolled = phase == infra_pb2.OPERATION_PHASE_SUCCEEDED
        self._condition(
            d, "RolledBack", rolled, "RollbackSucceeded" if rolled else "RollbackFailed", rb_why
        )
        await self._step(
            d,
            "rolled_back",
            SUCCESS if rolled else FAILURE,
            operation=back.id,
            history_id=previous,
        )
        if rolled:
            return await self._finish(
                d,
                pb.DEPLOYMENT_STATE_ROLLED_BACK,
                f"{why}; rolled back to history entry {previous}",
            )
        return await self._finish(
            d, pb.DEPLOYMENT_STATE_FAILED, f"{why}; the rollback failed too: {rb_why}"
        )

    async def _settle(self, app: str, op_id: str) -> tuple[int, int, str]:
        """Wait for operation ``op_id`` to end and the app's health to settle."""
        deadline = time.monotonic() + self.settings.health_timeout
        phase, health, message = infra_pb2.OPERATION_PHASE_RUNNING, 0, ""
        while time.monotonic() < deadline:
            application = await self.infra.application(app)
            state = application.status.operation_state
            health = application.status.health.status
            if state.id == op_id and state.phase in DONE_PHASES:
                phase, message = state.phase, state.message
                if phase != infra_pb2.OPERATION_PHASE_SUCCEEDED:
                    return phase, health, message or "the sync failed"
                # The stored health is the last reconcile's: refresh to read it now.
                application = await self.infra.refresh(app)
                health = application.status.health.status
                if health == HEALTHY or health in BAD_HEALTH:
                    why = application.status.health.message or infra_pb2.HealthStatusCode.Name(
                        health
                    )
                    return phase, health, why
            await asyncio.sleep(self.settings.health_poll)
        return (
            phase,
            health,
            f"not healthy within {self.settings.health_timeout:g}s ({message or 'still running'})",
        )

    async def _finish(self, d: pb.Deployment, state: int, message: str) -> pb.Deployment:
        d.state = state  # type: ignore[assignment]
        d.message = message
        d.end_time.CopyFrom(_now())
        d.update_time.CopyFrom(d.end_time)
        d = await self.store.put(d)
        ok = state == pb.DEPLOYMENT_STATE_SUCCEEDED
        await self._step(
            d,
            "completed",
            SUCCESS if ok else FAILURE,
            state=pb.DeploymentState.Name(state),  # type: ignore[arg-type]
            message=message,
        )
        done = ev.DeploymentCompleted(
            deployment=d.name,
            application=d.application,
            resolved_revision=d.resolved_revision,
            state=state,  # type: ignore[arg-type]
            dry_run=d.dry_run,
            failure_count=d.validation.failure_count,
            message=message,
        )
        done.end_time.CopyFrom(d.end_time)
        await self.events.publish(
            done, subject=d.name, resource=f"iaops/{d.name}", key=f"{d.name}/completed"
        )
        return d
