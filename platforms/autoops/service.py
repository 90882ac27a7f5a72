"""Platform-01 IndestructibleAutoOps's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import timestamp_pb2

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.kernel.mesh import paging
from autoecoops.kernel.mesh.audit import trail_for
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.platforms.autoops import openslo
from autoecoops.platforms.autoops.engine import SloEngine
from autoecoops.platforms.autoops.kernel import Kernel
from autoecoops.platforms.autoops.remediation import Remediator
from autoecoops.platforms.autoops.rules import render
from autoecoops.platforms.autoops.settings import AutoOpsSettings
from autoecoops.platforms.autoops.slo import resource_name
from autoecoops.platforms.autoops.store import AutoOpsStore
from autoecoops.platforms.autoops.triggers import EventTriggers

log = logging.getLogger("autoecoops.autoops")
DEFAULT_PAGE = 50
MAX_PAGE = 1000


@dataclass
class AutoOpsApp:
    """The platform's parts, wired once per process."""

    settings: AutoOpsSettings
    store: AutoOpsStore
    kernel: Kernel
    engine: SloEngine
    remediator: Remediator
    triggers: EventTriggers
    _loop: asyncio.Task[None] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        """Resume remediations cut off by the last stop; start the evaluation loop."""
        if self.settings.builtin_slos:
            await self.engine.ensure_builtin()
        await self.remediator.resume()
        await self.triggers.refresh()
        if self.settings.tick > 0:
            self._loop = asyncio.get_running_loop().create_task(self._run(), name="autoops tick")

    async def tick(self) -> float:
        """One pass: sample this process's mesh counts; then, if no replica has had this
        interval's evaluation yet, probe applications and evaluate every SLO.

        Returns the seconds until the next pass is due.
        """
        await self.engine.sample_mesh()  # every replica: its own RPC counts
        wait = await self.store.claim_tick(self.settings.tick)
        if wait > 0:
            return wait  # another replica evaluated within this interval
        await self.engine.probe_applications()
        await self.engine.evaluate()
        return self.settings.tick

    async def _run(self) -> None:
        passes = 0
        while not self._stopping.is_set():
            wait = self.settings.tick
            try:
                wait = await self.tick()
                passes += 1
                if passes % 100 == 1:
                    await self.engine.trim()
                if passes % 10 == 1:
                    # Runbooks changed through another replica, and remediations a
                    # replica that died was running (their lease lapsed).
                    await self.triggers.refresh()
                    await self.remediator.resume()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoops evaluation pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=max(0.01, wait))

    async def close(self) -> None:
        """Stop the loop and the remediations (their state stays in Redis)."""
        self._stopping.set()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(BaseException):
                await self._loop
        await self.triggers.close()
        await self.remediator.close()
        if self.engine.prometheus is not None:
            await self.engine.prometheus.close()
        await self.kernel.close()


def build(runtime: Runtime, settings: AutoOpsSettings | None = None) -> AutoOpsApp:
    """Wire the platform on a runtime."""
    settings = settings or AutoOpsSettings.from_env()
    store = AutoOpsStore(runtime.redis, runtime.key("autoops"), fine=settings.fine_bucket)
    kernel = Kernel(
        runtime.clients, trail_for(runtime, "autoops"), publish_events=settings.publish_events
    )
    engine = SloEngine(store, kernel, settings)
    remediator = Remediator(store, kernel, engine, settings)
    triggers = EventTriggers(runtime.clients, store, remediator)
    return AutoOpsApp(settings, store, kernel, engine, remediator, triggers)


class AutoOpsServicer(autoops_pb2_grpc.AutoOpsServiceServicer):
    """Serves autoecoops.autoops.v1.AutoOpsService."""

    def __init__(self, app: AutoOpsApp) -> None:
        self.app = app

    # -- SLOs -------------------------------------------------------------------

    async def CreateSlo(
        self, request: pb.CreateSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSloResponse:
        """Create an SLO (once per request_id)."""

        async def run() -> pb.CreateSloResponse:
            return pb.CreateSloResponse(
                slo=await self.app.engine.create(request.slo_id, request.slo)
            )

        return await self.app.store.once(
            "CreateSlo",
            request.request_id,
            request.SerializeToString(deterministic=True),
            run,
            pb.CreateSloResponse,
        )

    async def GetSlo(
        self, request: pb.GetSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSloResponse:
        """Get an SLO."""
        engine = self.app.engine
        slo = await engine.get(request.name)
        return pb.GetSloResponse(slo=await engine.with_conditions(slo, budget=True))

    async def ListSlos(
        self, request: pb.ListSlosRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSlosResponse:
        """A page of SLOs in name order."""
        slos = await self.app.engine.list_slos(request.service, dict(request.labels))
        page, token = paging.page_by_key(
            slos,
            request.page_size,
            request.page_token,
            lambda s: s.name,
            default=DEFAULT_PAGE,
            maximum=MAX_PAGE,
        )
        slos = [await self.app.engine.with_conditions(s) for s in page]
        return pb.ListSlosResponse(slos=slos, next_page_token=token)

    async def UpdateSlo(
        self, request: pb.UpdateSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSloResponse:
        """Update an SLO (etag-guarded)."""
        return pb.UpdateSloResponse(
            slo=await self.app.engine.update(request.slo, request.update_mask)
        )

    async def DeleteSlo(
        self, request: pb.DeleteSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSloResponse:
        """Delete an SLO and its data."""
        await self.app.engine.delete(request.name, request.etag)
        return pb.DeleteSloResponse()

    async def RecordSli(
        self, request: pb.RecordSliRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordSliResponse:
        """Store pushed samples."""
        accepted = await self.app.engine.record(request.slo, request.samples, request.request_id)
        return pb.RecordSliResponse(accepted_count=accepted)

    async def GetErrorBudget(
        self, request: pb.GetErrorBudgetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetErrorBudgetResponse:
        """The SLO's error budget now."""
        return pb.GetErrorBudgetResponse(error_budget=await self.app.engine.budget(request.slo))

    async def EvaluateSlos(
        self, request: pb.EvaluateSlosRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateSlosResponse:
        """Evaluate now; the alerts that changed."""
        # What a tick does: fresh mesh counts and application probes, then evaluation.
        await self.app.engine.sample_mesh()
        await self.app.engine.probe_applications()
        changed, count = await self.app.engine.evaluate(list(request.slos))
        return pb.EvaluateSlosResponse(changed_alerts=changed, evaluated_count=count)

    async def GetPrometheusRules(
        self, request: pb.GetPrometheusRulesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrometheusRulesResponse:
        """Prometheus rules for SLOs."""
        if request.slos:
            slos = [await self.app.engine.get(n) for n in request.slos]
        else:
            slos = sorted(await self.app.engine.list_slos(), key=lambda s: s.name)
        return pb.GetPrometheusRulesResponse(rules_yaml=render(slos, self.app.engine.clock()))

    async def ImportOpenSlo(
        self, request: pb.ImportOpenSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportOpenSloResponse:
        """Create or replace the SLOs of OpenSLO documents."""

        async def run() -> pb.ImportOpenSloResponse:
            return pb.ImportOpenSloResponse(
                slos=await openslo.import_into(self.app.engine, request.yaml, request.validate_only)
            )

        return await self.app.store.once(
            "ImportOpenSlo",
            request.request_id,
            request.SerializeToString(deterministic=True),
            run,
            pb.ImportOpenSloResponse,
        )

    async def ExportOpenSlo(
        self, request: pb.ExportOpenSloRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportOpenSloResponse:
        """SLOs as OpenSLO YAML."""
        if request.slos:
            slos = [await self.app.engine.get(n) for n in request.slos]
        else:
            slos = sorted(await self.app.engine.list_slos(), key=lambda s: s.name)
        return pb.ExportOpenSloResponse(yaml=openslo.export(slos))

    # -- alerts -------------------------------------------------------------------

    async def GetAlert(
        self, request: pb.GetAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAlertResponse:
        """Get an alert."""
        name = resource_name("alerts", request.name, "name")
        return pb.GetAlertResponse(alert=await self.app.store.get("alerts", name, pb.Alert))

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        """A page of alerts, newest first."""
        slo = resource_name("slos", request.slo, "slo") if request.slo else ""
        alerts = await self.app.engine.alerts(slo, request.state)
        keyed = [(_newest_first(a.fire_time, a.name), a) for a in alerts]
        page, token = paging.page_by_key(
            keyed,
            request.page_size,
            request.page_token,
            lambda p: p[0],
            default=DEFAULT_PAGE,
            maximum=MAX_PAGE,
        )
        return pb.ListAlertsResponse(alerts=[a for _, a in page], next_page_token=token)

    # -- runbooks -----------------------------------------------------------------

    async def CreateRunbook(
        self, request: pb.CreateRunbookRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateRunbookResponse:
        """Create a runbook (once per request_id)."""

        async def run() -> pb.CreateRunbookResponse:
            rb = await self.app.remediator.create_runbook(request.runbook_id, request.runbook)
            return pb.CreateRunbookResponse(runbook=rb)

        reply = await self.app.store.once(
            "CreateRunbook",
            request.request_id,
            request.SerializeToString(deterministic=True),
            run,
            pb.CreateRunbookResponse,
        )
        await self.app.triggers.refresh()
        return reply

    async def GetRunbook(
        self, request: pb.GetRunbookRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunbookResponse:
        """Get a runbook."""
        return pb.GetRunbookResponse(runbook=await self.app.remediator.get_runbook(request.name))

    async def ListRunbooks(
        self, request: pb.ListRunbooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunbooksResponse:
        """A page of runbooks in name order."""
        runbooks = await self.app.store.all("runbooks", pb.Runbook)
        page, token = paging.page_by_key(
            runbooks,
            request.page_size,
            request.page_token,
            lambda r: r.name,
            default=DEFAULT_PAGE,
            maximum=MAX_PAGE,
        )
        return pb.ListRunbooksResponse(runbooks=page, next_page_token=token)

    async def UpdateRunbook(
        self, request: pb.UpdateRunbookRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateRunbookResponse:
        """Update a runbook (etag-guarded)."""
        rb = await self.app.remediator.update_runbook(
            request.runbook, list(request.update_mask.paths)
        )
        await self.app.triggers.refresh()
        return pb.UpdateRunbookResponse(runbook=rb)

    async def DeleteRunbook(
        self, request: pb.DeleteRunbookRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRunbookResponse:
        """Delete a runbook."""
        await self.app.remediator.delete_runbook(request.name, request.etag)
        await self.app.triggers.refresh()
        return pb.DeleteRunbookResponse()

    async def RunRunbook(
        self, request: pb.RunRunbookRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunRunbookResponse:
        """Start a remediation by hand (once per request_id)."""
        from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

        if not request.reason:
            raise InvalidArgument(
                "reason is required",
                reason="FIELD_REQUIRED",
                field_violations=[FieldViolation("reason", "required field is missing")],
            )
        rb = await self.app.remediator.get_runbook(request.name)
        if not (request.target or rb.target):
            raise InvalidArgument(
                f"{rb.name} has no target; give one",
                reason="FIELD_REQUIRED",
                field_violations=[FieldViolation("target", "required when the runbook has none")],
            )

        async def run() -> pb.RunRunbookResponse:
            rem = await self.app.remediator.start(
                rb,
                reason=request.reason,
                target=request.target,
                principal=current_principal.get(),
                dry_run=request.dry_run,
            )
            return pb.RunRunbookResponse(remediation=rem)

        return await self.app.store.once(
            "RunRunbook",
            request.request_id,
            request.SerializeToString(deterministic=True),
            run,
            pb.RunRunbookResponse,
        )

    # -- remediations -------------------------------------------------------------

    async def ListRemediations(
        self, request: pb.ListRemediationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRemediationsResponse:
        """A page of remediations, newest first."""
        runbook = resource_name("runbooks", request.runbook, "runbook") if request.runbook else ""
        rems = await self.app.remediator.list_remediations(runbook, request.state)
        keyed = [(_newest_first(r.create_time, r.name), r) for r in rems]
        page, token = paging.page_by_key(
            keyed,
            request.page_size,
            request.page_token,
            lambda p: p[0],
            default=DEFAULT_PAGE,
            maximum=MAX_PAGE,
        )
        return pb.ListRemediationsResponse(remediations=[r for _, r in page], next_page_token=token)

    async def GetRemediation(
        self, request: pb.GetRemediationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRemediationResponse:
        """Get a remediation with its steps."""
        return pb.GetRemediationResponse(remediation=await self.app.remediator.get(request.name))

    async def ApproveRemediation(
        self, request: pb.ApproveRemediationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveRemediationResponse:
        """Approve a remediation awaiting approval."""
        rem = await self.app.remediator.approve(
            request.name, current_principal.get(), request.comment
        )
        return pb.ApproveRemediationResponse(remediation=rem)

    async def CancelRemediation(
        self, request: pb.CancelRemediationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelRemediationResponse:
        """Cancel a remediation."""
        rem = await self.app.remediator.cancel(
            request.name, current_principal.get(), request.reason
        )
        return pb.CancelRemediationResponse(remediation=rem)


def _newest_first(when: timestamp_pb2.Timestamp, name: str) -> str:
    """A cursor key that sorts newest first and stays put when newer items arrive."""
    return f"{(1 << 62) - when.ToNanoseconds():020d}:{name}"


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-01 IndestructibleAutoOps's servicer and start its loop."""
    app = build(runtime)
    runtime.starters.append(app.start)
    runtime.closers.append(app.close)
    autoops_pb2_grpc.add_AutoOpsServiceServicer_to_server(AutoOpsServicer(app), server)
    return [pb.DESCRIPTOR.services_by_name["AutoOpsService"].full_name]
