"""Self-healing: runbooks started by alerts, gated by safeguards, run step by step.

A remediation's state lives in Redis and every step is claimed there before
it runs, so after a restart a remediation resumes at its next step, and one
whose step was cut off half way is marked FAILED rather than run again
(an action such as a rollback must never happen twice by accident).

Safeguards, checked in this order before anything runs: a cooldown and a
rate limit per target, a blast-radius limit per application, and an
approval gate a policy-audit Rego decision answers. A platform-wide
concurrency limit queues what is over it. Every decision and step is an
audit entry carrying the remediation's trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import json_format, struct_pb2
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import events_pb2
from autoecoops.infra.v1 import infra_pb2
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
)
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.lease import Fence, Lease, LeaseLost, process_owner
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.engine import SloEngine, dur, ts
from autoecoops.platforms.autoops.kernel import FAILURE, SUCCESS, Kernel
from autoecoops.platforms.autoops.settings import AutoOpsSettings
from autoecoops.platforms.autoops.slo import check_id, resource_name, spec_of
from autoecoops.platforms.autoops.store import AutoOpsStore, check_etag, etag_of

log = logging.getLogger("autoecoops.autoops")
tracer = trace.get_tracer("autoecoops.autoops")
ENDED = frozenset(
    {
        pb.REMEDIATION_STATE_SUCCEEDED,
        pb.REMEDIATION_STATE_FAILED,
        pb.REMEDIATION_STATE_SKIPPED,
        pb.REMEDIATION_STATE_CANCELLED,
    }
)
DEFAULT_STEP_TIMEOUT = 300.0
DEFAULT_VERIFY_TIMEOUT = 300.0
RUNBOOK_WRITABLE = (
    "description",
    "trigger",
    "steps",
    "target",
    "safeguards",
    "escalation",
    "context_namespace",
)


@contextlib.contextmanager
def in_trace(trace_id: str) -> Iterator[None]:
    """Continue ``trace_id`` (a remediation's) in a background task."""
    if not trace_id:
        with tracer.start_as_current_span("autoops.remediation"):
            yield
        return
    ctx = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=uuid.uuid4().int & ((1 << 64) - 1) or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    with trace.use_span(NonRecordingSpan(ctx), end_on_exit=False):
        yield


def validate_runbook(rb: pb.Runbook, prefix: str = "runbook") -> None:
    """INVALID_ARGUMENT with every field violation of a runbook."""
    bad: list[FieldViolation] = []
    if not rb.steps:
        bad.append(FieldViolation(f"{prefix}.steps", "at least one step"))
    names = set()
    for i, step in enumerate(rb.steps):
        f = f"{prefix}.steps[{i}]"
        if not step.name:
            bad.append(FieldViolation(f"{f}.name", "required field is missing"))
        elif step.name in names:
            bad.append(FieldViolation(f"{f}.name", "step names must be unique"))
        names.add(step.name)
        if step.action not in pb.StepAction.values() or step.action == pb.STEP_ACTION_UNSPECIFIED:
            bad.append(FieldViolation(f"{f}.action", "required field is missing"))
        if step.action == pb.STEP_ACTION_WEBHOOK and not step.target.startswith(
            ("http://", "https://")
        ):
            bad.append(FieldViolation(f"{f}.target", "a WEBHOOK step's target is an http(s) URL"))
        if step.action == pb.STEP_ACTION_SCALE and step.target.count("/") != 2:
            bad.append(
                FieldViolation(
                    f"{f}.target", "a SCALE step's target is <application>/<kind>/<name>"
                )
            )
        needs_app = (pb.STEP_ACTION_ROLLBACK, pb.STEP_ACTION_SYNC, pb.STEP_ACTION_RESTART)
        if step.action in needs_app and not (step.target or rb.target):
            bad.append(FieldViolation(f"{f}.target", "needs a target (or the runbook's)"))
    sg = rb.safeguards
    if not 0 <= sg.max_blast_radius_percent <= 100:
        bad.append(FieldViolation(f"{prefix}.safeguards.max_blast_radius_percent", "0-100"))
    if sg.max_runs_per_hour < 0:
        bad.append(FieldViolation(f"{prefix}.safeguards.max_runs_per_hour", "must not be negative"))
    trig = rb.trigger
    if trig.WhichOneof("kind") == "event" and not (trig.event.event_type and trig.event.topic):
        bad.append(FieldViolation(f"{prefix}.trigger.event", "event_type and topic are required"))
    if rb.escalation.webhook_url and not rb.escalation.webhook_url.startswith(
        ("http://", "https://")
    ):
        bad.append(FieldViolation(f"{prefix}.escalation.webhook_url", "an http(s) URL"))
    if bad:
        raise InvalidArgument(
            f"the runbook is invalid: {bad[0].field}: {bad[0].description}",
            reason="INVALID_RUNBOOK",
            field_violations=bad,
        )


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


class Remediator:
    """Runbooks and the remediations they start."""

    def __init__(
        self,
        store: AutoOpsStore,
        kernel: Kernel,
        engine: SloEngine,
        settings: AutoOpsSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.kernel = kernel
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        #: Callers' identities of manual runs, kept in memory only (never in Redis).
        self._principals: dict[str, Principal] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        #: Whose remediation leases this process takes (kernel/mesh/lease.py).
        self.owner = process_owner(f"rem-{id(self):x}")
        #: The fence of each remediation this process runs; its writes carry it.
        self._fences: dict[str, Fence] = {}
        engine.on_fire.append(self.on_alert)

    # -- runbook CRUD -----------------------------------------------------------

    async def create_runbook(self, runbook_id: str, rb: pb.Runbook) -> pb.Runbook:
        """Validate and store a runbook."""
        from autoecoops.kernel.mesh.errors import AlreadyExists

        check_id(runbook_id, "runbook_id")
        out = pb.Runbook()
        out.CopyFrom(rb)
        out.name = f"runbooks/{runbook_id}"
        validate_runbook(out)
        now = self.clock()
        out.create_time.CopyFrom(ts(now))
        out.update_time.CopyFrom(ts(now))
        out.etag = etag_of(out)
        if not await self.store.create("runbooks", out.name, out):
            raise AlreadyExists(
                f"runbook {out.name} already exists",
                reason="RUNBOOK_EXISTS",
                resource_type="autoops.autoecoops.io/Runbook",
                resource_name=out.name,
            )
        return out

    async def get_runbook(self, name: str) -> pb.Runbook:
        """A stored runbook."""
        return await self.store.get("runbooks", resource_name("runbooks", name, "name"), pb.Runbook)

    async def update_runbook(self, patch: pb.Runbook, paths: list[str]) -> pb.Runbook:
        """Apply a masked update; ABORTED on a stale etag."""
        from google.protobuf import field_mask_pb2

        name = resource_name("runbooks", patch.name, "runbook.name")
        current = await self.store.get("runbooks", name, pb.Runbook)
        check_etag(patch.etag, current.etag, name)
        paths = paths or list(RUNBOOK_WRITABLE)
        bad = [p for p in paths if p.split(".")[0] not in RUNBOOK_WRITABLE]
        if bad:
            raise InvalidArgument(
                f"update_mask names fields that cannot be changed: {', '.join(bad)}",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation("update_mask", f"{p} is not writable") for p in bad
                ],
            )
        merged = pb.Runbook()
        merged.CopyFrom(current)
        mask = field_mask_pb2.FieldMask(paths=paths)
        if not mask.IsValidForDescriptor(pb.Runbook.DESCRIPTOR):
            raise InvalidArgument(
                "update_mask names a field Runbook does not have",
                reason="INVALID_UPDATE_MASK",
                field_violations=[FieldViolation("update_mask", "unknown field path")],
            )
        mask.MergeMessage(patch, merged, replace_message_field=True, replace_repeated_field=True)
        validate_runbook(merged)
        merged.update_time.CopyFrom(ts(self.clock()))
        merged.etag = etag_of(merged)
        await self.store.compare_and_put("runbooks", name, merged, current.etag, pb.Runbook)
        return merged

    async def delete_runbook(self, name: str, etag: str = "") -> None:
        """Delete a runbook (running remediations finish)."""
        name = resource_name("runbooks", name, "name")
        current = await self.store.get("runbooks", name, pb.Runbook)
        check_etag(etag, current.etag, name)
        await self.store.delete("runbooks", name)

    # -- triggers ---------------------------------------------------------------

    async def on_alert(self, slo: pb.Slo, alert: pb.Alert) -> None:
        """Start every runbook whose trigger matches a newly firing alert."""
        for rb in await self.store.all("runbooks", pb.Runbook):
            trig = rb.trigger
            kind = trig.WhichOneof("kind")
            if kind == "slo_alert":
                t = trig.slo_alert
                if t.slo and resource_name("slos", t.slo, "slo") != slo.name:
                    continue
                if alert.severity < t.min_severity:
                    continue
            elif kind == "label_selector":
                sel = trig.label_selector
                if any(slo.labels.get(k) != v for k, v in sel.match_labels.items()):
                    continue
                if alert.severity < sel.min_severity:
                    continue
            else:
                continue
            target = rb.target or slo.labels.get("application", "") or slo.service
            await self.start(
                rb,
                reason=alert.summary,
                target=target,
                alert=alert.name,
                context=list(alert.context),
                labels=dict(slo.labels),
            )

    # -- starting -------------------------------------------------------------

    async def start(
        self,
        rb: pb.Runbook,
        *,
        reason: str,
        target: str = "",
        principal: Principal | None = None,
        alert: str = "",
        event_id: str = "",
        dry_run: bool = False,
        context: list[pb.ContextCitation] | None = None,
        labels: dict[str, str] | None = None,
    ) -> pb.Remediation:
        """Create a remediation and, unless a safeguard holds it, run it."""
        now = self.clock()
        rem = pb.Remediation(
            name=f"remediations/{uuid.uuid4().hex[:20]}",
            runbook=rb.name,
            reason=reason,
            alert=alert,
            event_id=event_id,
            initiated_by=principal.subject if principal else "automated",
            state=pb.REMEDIATION_STATE_PENDING,
            target=target or rb.target,
            dry_run=dry_run or rb.safeguards.dry_run,
            trace_id=current_trace_id(),
        )
        rem.create_time.CopyFrom(ts(now))
        for step in rb.steps:
            rem.step_results.add(
                step=step.name,
                action=step.action,
                state=pb.STEP_STATE_PENDING,
                target=step.target or rem.target,
            )
        if context is None:
            context = await self.kernel.context(
                rb.context_namespace or self.settings.context_namespace,
                f"{rb.description} {reason} {rem.target}",
            )
        rem.context.extend(context)
        held = await self._safeguards(rb, rem, now)
        if held:
            rem.state = pb.REMEDIATION_STATE_SKIPPED
            rem.message = held
            rem.end_time.CopyFrom(ts(now))
            await self.store.save_remediation(rem, active=False)
            await self.kernel.audit(
                "autoops.remediation.skip",
                rem.name,
                outcome=FAILURE,
                details={"runbook": rb.name, "target": rem.target, "reason": held},
            )
            await self._completed(rem)
            return rem
        needs, decision_id, why = await self._approval(rb, rem, labels or {})
        rem.decision_id = decision_id
        if needs:
            rem.state = pb.REMEDIATION_STATE_AWAITING_APPROVAL
            rem.message = why
        await self.store.note_target_run(rem.target, now)
        await self.store.save_remediation(rem, active=True)
        await self.kernel.audit(
            "autoops.remediation.create",
            rem.name,
            details={
                "runbook": rb.name,
                "target": rem.target,
                "reason": reason,
                "approval_required": needs,
                "dry_run": rem.dry_run,
                "alert": alert,
            },
            actor=principal,
            decision_id=decision_id,
        )
        if principal is not None:
            self._principals[rem.name] = principal
        if not needs:
            self._spawn(rem.name)
        return rem

    async def _safeguards(self, rb: pb.Runbook, rem: pb.Remediation, now: float) -> str:
        """Why a safeguard holds the remediation back ('' when none does)."""
        sg = rb.safeguards
        target = rem.target
        if sg.HasField("cooldown"):
            cool = sg.cooldown.ToNanoseconds() / 1e9
            recent = await self.store.target_runs(target, now - cool)
            if recent:
                return f"cooldown: {target} was remediated {now - max(recent):.0f}s ago (cooldown {cool:g}s)"
        if sg.max_runs_per_hour:
            runs = await self.store.target_runs(target, now - burn.HOUR)
            if len(runs) >= sg.max_runs_per_hour:
                return f"rate limit: {len(runs)} remediations of {target} in the last hour (limit {sg.max_runs_per_hour})"
        if sg.max_blast_radius_percent and sg.max_blast_radius_percent < 100:
            app = target.split("/", 1)[0]
            busy = {
                r.target
                for r in await self.store.many(
                    "remediations", await self.store.active_remediations(), pb.Remediation
                )
                if r.target.split("/", 1)[0] == app
            }
            busy.add(target)
            total = await self._target_count(app)
            share = 100.0 * (len(busy) if "/" in target else total) / max(total, 1)
            if share > sg.max_blast_radius_percent:
                return (
                    f"blast radius: {share:.0f}% of {app}'s targets would be in remediation "
                    f"(limit {sg.max_blast_radius_percent}%)"
                )
        return ""

    async def _target_count(self, app: str) -> int:
        """How many workloads an application has (1 when infra-manager does not know it)."""
        try:
            application = await self.kernel.application(app)
        except AutoEcoOpsError:
            return 1
        kinds = {"Deployment", "StatefulSet", "DaemonSet"}
        return max(sum(1 for r in application.status.resources if r.resource.kind in kinds), 1)

    async def _approval(
        self, rb: pb.Runbook, rem: pb.Remediation, labels: dict[str, str]
    ) -> tuple[bool, str, str]:
        """(needs approval, decision id, why) from the runbook and the Rego policy."""
        document = {
            "runbook": rb.name,
            "target": rem.target,
            "initiated_by": rem.initiated_by,
            "automated": rem.initiated_by == "automated",
            "dry_run": rem.dry_run,
            "requires_approval": rb.safeguards.requires_approval,
            "actions": [pb.StepAction.Name(s.action) for s in rb.steps],
            "alert": rem.alert,
            "labels": labels,
        }
        try:
            result, decision_id, defined = await self.kernel.decide(
                self.settings.approval_policy, document
            )
        except AutoEcoOpsError as err:
            # Cannot ask the policy: fail safe, a human decides.
            return True, "", f"the approval policy could not be evaluated: {err.message}"
        # The policy decides when it is defined; without one, the runbook's flag does.
        needs = rb.safeguards.requires_approval and not rem.dry_run
        why = "the runbook requires approval" if needs else ""
        if defined:
            if isinstance(result, dict):
                needs = bool(result.get("required"))
                why = str(
                    result.get("reason") or ("the approval policy requires it" if needs else "")
                )
            else:
                needs = result is True
                why = "the approval policy requires it" if needs else ""
        await self.kernel.audit(
            "autoops.remediation.decide",
            rem.name,
            details={
                "approval_required": needs,
                "policy": self.settings.approval_policy,
                "defined": defined,
            },
            decision_id=decision_id,
        )
        return needs, decision_id, why

    # -- approval, cancel ---------------------------------------------------------

    async def get(self, name: str) -> pb.Remediation:
        """A stored remediation."""
        return await self.store.get(
            "remediations", resource_name("remediations", name, "name"), pb.Remediation
        )

    async def approve(self, name: str, principal: Principal | None, comment: str) -> pb.Remediation:
        """Let a remediation awaiting approval run."""
        rem = await self.get(name)
        if rem.state != pb.REMEDIATION_STATE_AWAITING_APPROVAL:
            if rem.approved_by and rem.state not in (
                pb.REMEDIATION_STATE_CANCELLED,
                pb.REMEDIATION_STATE_SKIPPED,
            ):
                return rem  # approving twice is a no-op
            raise FailedPrecondition(
                f"{rem.name} is {pb.RemediationState.Name(rem.state)}, not awaiting approval",
                reason="NOT_AWAITING_APPROVAL",
                resource_name=rem.name,
            )
        if principal is not None and principal.subject == rem.initiated_by:
            # Four eyes: whoever started a gated remediation cannot approve it.
            raise PermissionDenied(
                f"{principal.subject} started {rem.name} and cannot approve it too",
                reason="SELF_APPROVAL",
                resource_name=rem.name,
            )
        rem.state = pb.REMEDIATION_STATE_PENDING
        rem.approved_by = principal.subject if principal else "unknown"
        rem.message = comment
        await self.store.save_remediation(rem, active=True)
        with in_trace(rem.trace_id):
            await self.kernel.audit(
                "autoops.remediation.approve",
                rem.name,
                details={"comment": comment},
                actor=principal,
                decision_id=rem.decision_id,
            )
        self._spawn(rem.name)
        return rem

    async def cancel(self, name: str, principal: Principal | None, reason: str) -> pb.Remediation:
        """Cancel a remediation; a running one stops after its current action."""
        rem = await self.get(name)
        if rem.state in ENDED:
            return rem
        rem.state = pb.REMEDIATION_STATE_CANCELLED
        rem.message = reason or "cancelled"
        rem.end_time.CopyFrom(ts(self.clock()))
        for r in rem.step_results:
            if r.state == pb.STEP_STATE_PENDING:
                r.state = pb.STEP_STATE_SKIPPED
        await self.store.save_remediation(rem, active=False)
        event = self._cancel.get(rem.name)
        if event is not None:
            event.set()
        with in_trace(rem.trace_id):
            await self.kernel.audit(
                "autoops.remediation.cancel", rem.name, details={"reason": reason}, actor=principal
            )
            await self._completed(rem)
        return rem

    async def list_remediations(self, runbook: str = "", state: int = 0) -> list[pb.Remediation]:
        """Remediations newest first, filtered."""
        out = []
        names = await self.store.remediation_names()
        for r in await self.store.many("remediations", names, pb.Remediation):
            if runbook and r.runbook != runbook:
                continue
            if state and r.state != state:
                continue
            out.append(r)
        return out

    # -- running ------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        if name in self._tasks and not self._tasks[name].done():
            return
        self._cancel.setdefault(name, asyncio.Event())
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._run(name), name=f"remediation {name}"
        )

    async def resume(self) -> None:
        """After a start: pick up every remediation that had not ended."""
        for name in await self.store.active_remediations():
            rem = await self.store.find("remediations", name, pb.Remediation)
            if rem is None:
                continue
            if rem.state in (pb.REMEDIATION_STATE_PENDING, pb.REMEDIATION_STATE_RUNNING):
                self._spawn(name)

    async def close(self) -> None:
        """Stop running remediations (their state stays; the next start resumes them)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _run(self, name: str) -> None:
        async with self._slots:
            # One replica runs a remediation: the holder of its lease. Another
            # replica's resume (or approve) finds it held and leaves it alone;
            # once a dead holder's lease lapses, the next resume takes it over.
            lease = Lease(
                self.store.redis,
                self.store.remediation_lease(name),
                self.owner,
                self.settings.lease,
            )
            if not await lease.acquire():
                return
            try:
                async with lease.kept():
                    self._fences[name] = lease.fence
                    rem = await self.store.find("remediations", name, pb.Remediation)
                    if rem is None or rem.state not in (
                        pb.REMEDIATION_STATE_PENDING,
                        pb.REMEDIATION_STATE_RUNNING,
                    ):
                        return
                    with in_trace(rem.trace_id):
                        try:
                            await self._steps(rem)
                        except (asyncio.CancelledError, LeaseLost):
                            raise
                        except Exception as err:
                            log.exception("remediation %s failed", name)
                            await self._finish(
                                rem, pb.REMEDIATION_STATE_FAILED, f"internal error: {err}"
                            )
            except LeaseLost:
                log.warning("remediation %s moved to another replica; this one stops", name)
            finally:
                self._fences.pop(name, None)

    async def _save(self, rem: pb.Remediation, active: bool) -> None:
        """Store ``rem`` as its runner: refused (``LeaseLost``) once its lease moved."""
        await self.store.save_remediation(rem, active, self._fences.get(rem.name))

    async def _fresh_state(self, name: str) -> int:
        cur = await self.store.find("remediations", name, pb.Remediation)
        return cur.state if cur is not None else pb.REMEDIATION_STATE_CANCELLED

    async def _steps(self, rem: pb.Remediation) -> None:
        rb = await self.store.find("runbooks", rem.runbook, pb.Runbook)
        if rb is None:
            await self._finish(
                rem, pb.REMEDIATION_STATE_FAILED, f"runbook {rem.runbook} was deleted"
            )
            return
        marks = await self.store.step_marks(rem.name)
        if rem.state == pb.REMEDIATION_STATE_PENDING:
            rem.state = pb.REMEDIATION_STATE_RUNNING
            rem.start_time.CopyFrom(ts(self.clock()))
            await self._save(rem, active=True)
            await self.kernel.publish(
                events_pb2.RemediationStarted(
                    remediation=rem.name,
                    runbook=rem.runbook,
                    reason=rem.reason,
                    alert=rem.alert,
                    initiated_by=rem.initiated_by,
                    start_time=rem.start_time,
                    target=rem.target,
                    dry_run=rem.dry_run,
                ),
                subject=rem.name,
                resource=f"autoops/{rem.name}",
                key=f"start:{rem.name}",
            )
        cancel = self._cancel.setdefault(rem.name, asyncio.Event())
        for i, step in enumerate(rb.steps):
            if i >= len(rem.step_results):
                break
            result = rem.step_results[i]
            if marks.get(i) == "done":
                if result.state == pb.STEP_STATE_SUCCEEDED:
                    await self._finish(
                        rem, pb.REMEDIATION_STATE_SUCCEEDED, f"step {step.name} fixed it"
                    )
                    return
                continue
            if marks.get(i) == "started":
                # Cut off mid-step by a restart: whether the action happened is
                # unknown, so it is not repeated; a human looks.
                result.state = pb.STEP_STATE_FAILED
                result.message = "the platform stopped while this step ran; not run again"
                await self.store.finish_step(rem.name, i, self._fences.get(rem.name))
                await self._finish(
                    rem,
                    pb.REMEDIATION_STATE_FAILED,
                    f"interrupted during step {step.name} by a platform restart; not re-run",
                )
                return
            if (
                await self._fresh_state(rem.name) == pb.REMEDIATION_STATE_CANCELLED
                or cancel.is_set()
            ):
                return
            if not await self.store.claim_step(rem.name, i, self._fences.get(rem.name)):
                return  # another replica has it
            ok = await self._step(rem, rb, i, step, result, cancel)
            await self.store.finish_step(rem.name, i, self._fences.get(rem.name))
            await self._save(rem, active=True)
            if await self._fresh_state(rem.name) == pb.REMEDIATION_STATE_CANCELLED:
                return
            if ok:
                for later in rem.step_results[i + 1 :]:
                    later.state = pb.STEP_STATE_SKIPPED
                await self._finish(
                    rem, pb.REMEDIATION_STATE_SUCCEEDED, f"step {step.name} fixed it"
                )
                return
        await self._escalate(rem, rb)

    async def _step(
        self,
        rem: pb.Remediation,
        rb: pb.Runbook,
        index: int,
        step: pb.RunbookStep,
        result: pb.StepResult,
        cancel: asyncio.Event,
    ) -> bool:
        target = step.target or rem.target
        result.target = target
        result.state = pb.STEP_STATE_RUNNING
        result.dry_run = rem.dry_run
        result.start_time.CopyFrom(ts(self.clock()))
        await self._save(rem, active=True)
        params = json_format.MessageToDict(step.parameters) if step.HasField("parameters") else {}
        principal = self._principals.get(rem.name)
        output: dict[str, Any] = {}
        ok = True
        message = ""
        try:
            if rem.dry_run:
                message = f"dry run: would {pb.StepAction.Name(step.action)} {target} with {params}"
            else:
                timeout = (
                    step.timeout.ToNanoseconds() / 1e9
                    if step.HasField("timeout")
                    else DEFAULT_STEP_TIMEOUT
                )
                output, message = await asyncio.wait_for(
                    self._act(rem, step, target, params, principal), timeout=timeout
                )
        except (AutoEcoOpsError, TimeoutError) as err:
            ok = False
            message = err.message if isinstance(err, AutoEcoOpsError) else "the action timed out"
        if ok and not rem.dry_run and step.HasField("verification"):
            ok, verdict = await self._verify(step.verification, target, cancel)
            message = f"{message}; {verdict}" if message else verdict
        result.state = pb.STEP_STATE_SUCCEEDED if ok else pb.STEP_STATE_FAILED
        result.message = message
        result.output.CopyFrom(_struct(output))
        result.end_time.CopyFrom(ts(self.clock()))
        await self.kernel.audit(
            "autoops.remediation.step",
            rem.name,
            outcome=SUCCESS if ok else FAILURE,
            details={
                "runbook": rb.name,
                "step": step.name,
                "index": index,
                "action": pb.StepAction.Name(step.action),
                "target": target,
                "dry_run": rem.dry_run,
                "message": message[:500],
                **{k: v for k, v in output.items() if isinstance(v, str | int | float | bool)},
            },
            actor=principal,
        )
        return ok

    async def _act(
        self,
        rem: pb.Remediation,
        step: pb.RunbookStep,
        target: str,
        params: dict[str, Any],
        principal: Principal | None,
    ) -> tuple[dict[str, Any], str]:
        action = step.action
        if action == pb.STEP_ACTION_ROLLBACK:
            op = await self.kernel.rollback(target, int(params.get("history_id", 0)), principal)
            op = await self._wait_operation(target, op, principal)
            return (
                {
                    "operation_id": op.id,
                    "history_id": op.rollback_history_id,
                    "phase": infra_pb2.OperationPhase.Name(op.phase),
                },
                f"rolled {target} back to history entry {op.rollback_history_id}: {op.message}",
            )
        if action in (pb.STEP_ACTION_SYNC, pb.STEP_ACTION_RESTART):
            op = await self.kernel.sync(
                target,
                revision=str(params.get("revision", "")),
                prune=bool(params.get("prune", False)),
                principal=principal,
            )
            op = await self._wait_operation(target, op, principal)
            verb = "restarted (re-synced)" if action == pb.STEP_ACTION_RESTART else "synced"
            return (
                {"operation_id": op.id, "phase": infra_pb2.OperationPhase.Name(op.phase)},
                f"{verb} {target}: {op.message}",
            )
        if action == pb.STEP_ACTION_SCALE:
            raise FailedPrecondition(
                "SCALE needs infra-manager support for a replica override, which it does not offer yet",
                reason="ACTION_NOT_SUPPORTED",
            )
        if action == pb.STEP_ACTION_PUBLISH:
            event = events_pb2.RemediationEscalated(
                remediation=rem.name,
                runbook=rem.runbook,
                target=target,
                message=str(params.get("message", rem.reason)),
                alert=rem.alert,
            )
            event.escalate_time.CopyFrom(ts(self.clock()))
            sent = await self.kernel.publish(
                event,
                subject=rem.name,
                resource=f"autoops/{rem.name}",
                key=f"publish:{rem.name}:{step.name}",
            )
            if not sent:
                raise FailedPrecondition(
                    "the event bus did not take the event", reason="PUBLISH_FAILED"
                )
            return {"published": True}, "published a notification on the bus"
        if action == pb.STEP_ACTION_WEBHOOK:
            self._allowed(target)
            body = params.get("body")
            if not isinstance(body, dict):
                body = {
                    "remediation": rem.name,
                    "target": rem.target,
                    "reason": rem.reason,
                    **({"message": body} if body else {}),
                }
            status = await self.kernel.webhook(target, body)
            if status >= 300:
                raise FailedPrecondition(
                    f"webhook {target} answered {status}", reason="WEBHOOK_FAILED"
                )
            return {"status": status}, f"webhook answered {status}"
        raise FailedPrecondition(f"unknown action {action}", reason="UNKNOWN_ACTION")

    def _allowed(self, url: str) -> None:
        allow = self.settings.webhook_allow
        if allow and not any(url.startswith(p) for p in allow):
            raise FailedPrecondition(
                f"webhook {url} is not in AUTOECOOPS_AUTOOPS_WEBHOOK_ALLOW",
                reason="WEBHOOK_NOT_ALLOWED",
            )

    async def _wait_operation(
        self, app: str, op: infra_pb2.OperationState, principal: Principal | None
    ) -> infra_pb2.OperationState:
        """Wait for an infra-manager operation to leave RUNNING; FAILED_PRECONDITION if it failed."""
        history_id = op.rollback_history_id
        while op.phase in (
            infra_pb2.OPERATION_PHASE_UNSPECIFIED,
            infra_pb2.OPERATION_PHASE_RUNNING,
        ):
            await asyncio.sleep(0.5)
            application = await self.kernel.application(app, principal)
            current = application.status.operation_state
            if current.id == op.id or not op.id:
                op = infra_pb2.OperationState()
                op.CopyFrom(current)
        op.rollback_history_id = op.rollback_history_id or history_id
        if op.phase != infra_pb2.OPERATION_PHASE_SUCCEEDED:
            raise FailedPrecondition(
                f"infra-manager operation {op.id} on {app} ended {infra_pb2.OperationPhase.Name(op.phase)}: {op.message}",
                reason="OPERATION_FAILED",
            )
        return op

    async def _verify(
        self, v: pb.Verification, target: str, cancel: asyncio.Event
    ) -> tuple[bool, str]:
        """Poll the verification until it passes or times out."""
        delay = v.delay.ToNanoseconds() / 1e9
        timeout = (
            v.timeout.ToNanoseconds() / 1e9 if v.HasField("timeout") else DEFAULT_VERIFY_TIMEOUT
        )
        if delay and await _wait(cancel, delay):
            return False, "cancelled while waiting to verify"
        deadline = time.monotonic() + timeout
        kind = v.WhichOneof("kind")
        last = "no check ran"
        while True:
            try:
                if kind == "slo_recovered":
                    ok, last = await self._slo_recovered(v.slo_recovered)
                elif kind == "promql":
                    if self.engine.prometheus is None:
                        return False, "no Prometheus is configured for a PromQL verification"
                    result = await self.engine.prometheus.query(v.promql)
                    ok, last = bool(result), f"{v.promql} returned {len(result)} series"
                elif kind == "application_healthy":
                    app = await self.kernel.application(target)
                    st = app.status
                    ok = (
                        st.health.status == infra_pb2.HEALTH_STATUS_CODE_HEALTHY
                        and st.sync.status == infra_pb2.SYNC_STATUS_CODE_SYNCED
                    )
                    last = f"{target} is {infra_pb2.HealthStatusCode.Name(st.health.status)}/{infra_pb2.SyncStatusCode.Name(st.sync.status)}"
                else:
                    return True, "no verification"
            except AutoEcoOpsError as err:
                ok, last = False, err.message
            if ok:
                return True, f"verified: {last}"
            if time.monotonic() >= deadline:
                return False, f"verification timed out: {last}"
            if await _wait(
                cancel, min(self.settings.verify_poll, max(deadline - time.monotonic(), 0.01))
            ):
                return False, "cancelled while verifying"

    async def _slo_recovered(self, name: str) -> tuple[bool, str]:
        slo = await self.engine.get(name)
        await self.engine.evaluate([slo.name])
        state = await self.store.alert_state(slo.name)
        spec = spec_of(slo, self.clock())
        paging = [i for i in state if i < len(spec.rows) and spec.rows[i].page]
        budget = await self.engine.budget(slo.name)
        short = min(
            (b for b in budget.burn_rates), key=lambda b: b.window.ToNanoseconds(), default=None
        )
        short_rate = short.rate if short is not None else 0.0
        if paging:
            return False, f"{slo.name} still has {len(paging)} page alert(s) firing"
        if short_rate >= 1.0:
            return False, f"{slo.name} still burns {short_rate:.1f}x over its shortest window"
        return (
            True,
            f"{slo.name} recovered (no page alert, {short_rate:.2f}x over its shortest window)",
        )

    # -- ending -------------------------------------------------------------------

    async def _escalate(self, rem: pb.Remediation, rb: pb.Runbook) -> None:
        delivered = False
        message = f"every step of {rb.name} failed on {rem.target}"
        if rb.escalation.webhook_url:
            try:
                self._allowed(rb.escalation.webhook_url)
                status = await self.kernel.webhook(
                    rb.escalation.webhook_url,
                    {
                        "remediation": rem.name,
                        "runbook": rb.name,
                        "target": rem.target,
                        "reason": rem.reason,
                        "message": message,
                        "steps": [
                            {
                                "step": r.step,
                                "state": pb.StepState.Name(r.state),
                                "message": r.message,
                            }
                            for r in rem.step_results
                        ],
                    },
                )
                delivered = status < 300
            except AutoEcoOpsError as err:
                log.warning("escalation webhook of %s failed: %s", rem.name, err.message)
        event = events_pb2.RemediationEscalated(
            remediation=rem.name,
            runbook=rb.name,
            target=rem.target,
            message=message,
            alert=rem.alert,
            webhook_delivered=delivered,
        )
        event.escalate_time.CopyFrom(ts(self.clock()))
        await self.kernel.publish(
            event, subject=rem.name, resource=f"autoops/{rem.name}", key=f"escalate:{rem.name}"
        )
        await self.kernel.audit(
            "autoops.remediation.escalate",
            rem.name,
            outcome=FAILURE,
            details={"runbook": rb.name, "target": rem.target, "webhook_delivered": delivered},
        )
        await self._finish(rem, pb.REMEDIATION_STATE_FAILED, message + "; escalated")

    async def _finish(self, rem: pb.Remediation, state: int, message: str) -> None:
        if await self._fresh_state(rem.name) == pb.REMEDIATION_STATE_CANCELLED:
            return
        rem.state = state  # type: ignore[assignment]
        rem.message = message
        rem.end_time.CopyFrom(ts(self.clock()))
        # The entry first: whoever sees the remediation ended finds it in the trail.
        await self.kernel.audit(
            "autoops.remediation.complete",
            rem.name,
            outcome=SUCCESS if state == pb.REMEDIATION_STATE_SUCCEEDED else FAILURE,
            details={
                "state": pb.RemediationState.Name(state),  # type: ignore[arg-type]
                "message": message[:500],
                "target": rem.target,
            },
        )
        await self._save(rem, active=False)
        self._principals.pop(rem.name, None)
        await self._completed(rem)

    async def _completed(self, rem: pb.Remediation) -> None:
        await self.kernel.publish(
            events_pb2.RemediationCompleted(
                remediation=rem.name,
                runbook=rem.runbook,
                state=rem.state,
                message=rem.message,
                step_results=list(rem.step_results),
                end_time=rem.end_time,
                target=rem.target,
            ),
            subject=rem.name,
            resource=f"autoops/{rem.name}",
            key=f"complete:{rem.name}",
        )


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``event`` is set first; True when it was."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return False


__all__ = ["Remediator", "dur", "validate_runbook"]
