"""The SLO engine: CRUD, ingest, window counts, budgets and the alert loop.

Each tick reads every SLO's window counts from its source, steps each row of
its burn-rate table, and for every row whose state changed stores the alert,
writes an audit entry, publishes SloBreached/SloResolved and hands firing
alerts to the remediator. One evaluation is one trace, so its audit entries,
events and the remediation it starts share a trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from opentelemetry import trace

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import events_pb2
from autoecoops.kernel.mesh.errors import (
    Aborted,
    AlreadyExists,
    AutoEcoOpsError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
)
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.lease import Fence, Lease, LeaseLost, process_owner
from autoecoops.platforms.autoops import burn
from autoecoops.platforms.autoops.kernel import Kernel
from autoecoops.platforms.autoops.settings import AutoOpsSettings
from autoecoops.platforms.autoops.slo import Spec, check_id, resource_name, spec_of, validate
from autoecoops.platforms.autoops.sources import (
    MeshSampler,
    PrometheusClient,
    split_windows,
    window_counts,
)
from autoecoops.platforms.autoops.store import COARSE, AutoOpsStore, check_etag, etag_of

log = logging.getLogger("autoecoops.autoops")
tracer = trace.get_tracer("autoecoops.autoops")

#: Fields of Slo an update mask may name.
WRITABLE = (
    "service",
    "description",
    "indicator",
    "objective",
    "time_window",
    "alert_policy",
    "labels",
    "owner",
    "display_name",
)
OnFire = Callable[[pb.Slo, pb.Alert], Awaitable[None]]


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp of epoch seconds."""
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def dur(seconds: float) -> duration_pb2.Duration:
    """A Duration of seconds."""
    out = duration_pb2.Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


class SloEngine:
    """SLOs, their data and their alerts."""

    def __init__(
        self,
        store: AutoOpsStore,
        kernel: Kernel,
        settings: AutoOpsSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.kernel = kernel
        self.settings = settings
        self.clock = clock
        self.prometheus = (
            PrometheusClient(settings.prometheus_url) if settings.prometheus_url else None
        )
        self.mesh = MeshSampler()
        #: Called with each alert that starts firing (the remediator's trigger).
        self.on_fire: list[OnFire] = []
        self._lock = asyncio.Lock()
        #: Whose evaluation lease this engine takes (one owner per engine: the lock
        #: above already serialises this process's evaluations).
        self.owner = process_owner(f"slo-{id(self):x}")
        #: The evaluation lease's fence while an evaluation runs; its alert writes carry it.
        self._fence: Fence | None = None

    # -- CRUD -----------------------------------------------------------------

    async def create(self, slo_id: str, slo: pb.Slo) -> pb.Slo:
        """Validate and store a new SLO."""
        check_id(slo_id, "slo_id")
        now = self.clock()
        out = pb.Slo()
        out.CopyFrom(slo)
        out.name = f"slos/{slo_id}"
        del out.conditions[:]
        out.ClearField("create_time")
        out.ClearField("update_time")
        validate(out, now)
        out.create_time.CopyFrom(ts(now))
        out.update_time.CopyFrom(ts(now))
        out.etag = etag_of(out)
        if not await self.store.create("slos", out.name, out):
            raise AlreadyExists(
                f"SLO {out.name} already exists",
                reason="SLO_EXISTS",
                resource_type="autoops.autoecoops.io/Slo",
                resource_name=out.name,
            )
        return out

    async def get(self, name: str) -> pb.Slo:
        """A stored SLO."""
        return await self.store.get("slos", resource_name("slos", name, "name"), pb.Slo)

    async def with_conditions(self, slo: pb.Slo, budget: bool = False) -> pb.Slo:
        """``slo`` with its observed conditions: ``Burning`` (from its firing alerts)
        and, with ``budget``, ``BudgetExhausted`` (from its error budget)."""
        from autoecoops.common.v1 import types_pb2

        state = await self.store.alert_state(slo.name)
        firing = await self.store.many("alerts", list(state.values()), pb.Alert)
        cond = types_pb2.Condition(type="Burning")
        if firing:
            worst = max(firing, key=lambda a: a.severity)
            cond.status = types_pb2.CONDITION_STATUS_TRUE
            cond.reason = "BurnRateAlertFiring"
            cond.message = "; ".join(a.summary for a in firing)
            cond.severity = worst.severity
            first = min(firing, key=lambda a: a.fire_time.ToNanoseconds())
            cond.last_transition_time.CopyFrom(first.fire_time)
        else:
            cond.status = types_pb2.CONDITION_STATUS_FALSE
            cond.reason = "NoAlertFiring"
        out = pb.Slo()
        out.CopyFrom(slo)
        del out.conditions[:]
        out.conditions.append(cond)
        if budget:
            spent = types_pb2.Condition(type="BudgetExhausted")
            try:
                b = await self.budget(slo.name)
            except AutoEcoOpsError as err:  # e.g. Prometheus unreachable
                spent.status = types_pb2.CONDITION_STATUS_UNKNOWN
                spent.reason = err.reason
                spent.message = err.message
            else:
                exhausted = b.status == pb.ERROR_BUDGET_STATUS_EXHAUSTED
                spent.status = (
                    types_pb2.CONDITION_STATUS_TRUE
                    if exhausted
                    else types_pb2.CONDITION_STATUS_FALSE
                )
                spent.reason = "ErrorBudgetSpent" if exhausted else "ErrorBudgetLeft"
                spent.message = f"{b.remaining_fraction:.1%} of the budget left"
                if exhausted:
                    spent.severity = types_pb2.SEVERITY_HIGH
            out.conditions.append(spent)
        return out

    async def list_slos(
        self, service: str = "", labels: dict[str, str] | None = None
    ) -> list[pb.Slo]:
        """Every SLO matching the filters."""
        out = []
        for slo in await self.store.all("slos", pb.Slo):
            if service and slo.service != service:
                continue
            if labels and any(slo.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(slo)
        return out

    async def update(self, patch: pb.Slo, mask: field_mask_pb2.FieldMask) -> pb.Slo:
        """Apply ``patch`` under ``mask``; ABORTED on a stale etag."""
        name = resource_name("slos", patch.name, "slo.name")
        current = await self.store.get("slos", name, pb.Slo)
        check_etag(patch.etag, current.etag, name)
        paths = list(mask.paths) or list(WRITABLE)
        bad = [p for p in paths if p.split(".")[0] not in WRITABLE]
        if bad:
            raise InvalidArgument(
                f"update_mask names fields that cannot be changed: {', '.join(bad)}",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation("update_mask", f"{p} is not writable") for p in bad
                ],
            )
        merged = pb.Slo()
        merged.CopyFrom(current)
        effective = field_mask_pb2.FieldMask(paths=paths)
        if not effective.IsValidForDescriptor(pb.Slo.DESCRIPTOR):
            raise InvalidArgument(
                "update_mask names a field Slo does not have",
                reason="INVALID_UPDATE_MASK",
                field_violations=[FieldViolation("update_mask", "unknown field path")],
            )
        effective.MergeMessage(
            patch, merged, replace_message_field=True, replace_repeated_field=True
        )
        now = self.clock()
        validate(merged, now)
        merged.update_time.CopyFrom(ts(now))
        merged.etag = etag_of(merged)
        await self.store.compare_and_put("slos", name, merged, current.etag, pb.Slo)
        after, before = spec_of(merged, now), spec_of(current, now)
        if after.rows != before.rows or not after.alerting:
            # The table's rows (and their indexes) changed, or alerting is off:
            # close the old episodes.
            await self._retire_alerts(merged, "the SLO's alert table changed")
        return merged

    async def _retire_alerts(self, slo: pb.Slo, why: str) -> None:
        """Resolve every firing alert of ``slo`` (it changed or went away)."""
        now = self.clock()
        for row, alert_name in (await self.store.alert_state(slo.name)).items():
            alert = await self.store.find("alerts", alert_name, pb.Alert)
            if alert is None or alert.state != pb.ALERT_STATE_FIRING:
                continue
            alert.state = pb.ALERT_STATE_RESOLVED
            alert.summary = f"{alert.summary}; resolved because {why}"
            alert.resolve_time.CopyFrom(ts(now))
            await self.store.save_alert(alert, slo.name, row)
            await self._resolved(slo, alert)

    async def delete(self, name: str, etag: str = "") -> None:
        """Delete an SLO with its data and alert state."""
        name = resource_name("slos", name, "name")
        current = await self.store.get("slos", name, pb.Slo)
        check_etag(etag, current.etag, name)
        await self._retire_alerts(current, "the SLO was deleted")
        await self.store.delete("slos", name)
        await self.store.drop_slo_data(name)

    # -- ingest ---------------------------------------------------------------

    async def record(self, name: str, samples: Sequence[pb.SliSample], request_id: str) -> int:
        """Store pushed samples; how many were accepted."""
        slo = await self.get(name)
        if (slo.indicator.source or pb.SLI_SOURCE_PUSHED) != pb.SLI_SOURCE_PUSHED:
            raise FailedPrecondition(
                f"{slo.name} reads its SLI from {pb.SliSource.Name(slo.indicator.source)}, not from pushed samples",
                reason="SLO_NOT_PUSHED",
                resource_name=slo.name,
            )
        if not samples:
            raise InvalidArgument(
                "samples must not be empty",
                reason="FIELD_REQUIRED",
                field_violations=[FieldViolation("samples", "at least one sample")],
            )
        if len(samples) > self.settings.max_samples:
            raise InvalidArgument(
                f"at most {self.settings.max_samples} samples per call",
                reason="TOO_MANY_SAMPLES",
                field_violations=[
                    FieldViolation("samples", f"at most {self.settings.max_samples}")
                ],
            )
        now = self.clock()
        oldest = now - self.settings.coarse_retention
        bad: list[FieldViolation] = []
        rows: list[tuple[float, int, int]] = []
        for i, s in enumerate(samples):
            if s.total_count < 0 or s.good_count < 0:
                bad.append(FieldViolation(f"samples[{i}]", "counts must not be negative"))
            elif s.good_count > s.total_count:
                bad.append(
                    FieldViolation(f"samples[{i}].good_count", "must not exceed total_count")
                )
            t = s.time.ToNanoseconds() / 1e9 if s.HasField("time") else now
            if t > now + 300:
                bad.append(
                    FieldViolation(f"samples[{i}].time", "more than 5 minutes in the future")
                )
            if not bad and t >= oldest:
                rows.append((t, int(s.good_count), int(s.total_count)))
        if bad:
            raise InvalidArgument(
                f"{len(bad)} sample(s) are invalid: {bad[0].field}: {bad[0].description}",
                reason="INVALID_SAMPLES",
                field_violations=bad,
            )
        if rows:
            fresh = await self.store.record(slo.name, rows, request_id, now)
            if not fresh:
                return len(rows)  # a retry: counted the first time
        return len(rows)

    # -- counts, budgets --------------------------------------------------------

    async def counts(
        self, slo: pb.Slo, spec: Spec, windows: Sequence[float], now: float
    ) -> dict[float, burn.Counts]:
        """Good/total over each window, from the SLO's source."""
        if spec.source == pb.SLI_SOURCE_PROMETHEUS:
            if self.prometheus is None:
                raise FailedPrecondition(
                    "no Prometheus is configured (AUTOECOOPS_AUTOOPS_PROMETHEUS_URL)",
                    reason="PROMETHEUS_NOT_CONFIGURED",
                )
            return await self.prometheus.counts(slo.indicator, windows, now)
        size, keep = self.store.fine, self.settings.fine_retention
        _, fine_span, _, coarse_span = split_windows(windows, keep, size)
        fine = await self.store.dense(slo.name, "m", size, int(now // size), fine_span)
        coarse = await self.store.dense(slo.name, "h", COARSE, int(now // COARSE), coarse_span)
        return window_counts(fine, coarse, windows, keep, size)

    async def sample_mesh(self) -> None:
        """Move the mesh's new RPC counts into the buckets of MESH SLOs."""
        now = self.clock()
        for slo in await self.store.all("slos", pb.Slo):
            if slo.indicator.source != pb.SLI_SOURCE_MESH:
                continue
            good, total = self.mesh.delta(slo.name, slo.indicator)
            if total > 0:
                await self.store.record(slo.name, [(now, good, total)], "", now)

    async def ensure_builtin(self) -> list[pb.Slo]:
        """Create the built-in SLOs over the mesh's own RPC metrics (those missing).

        For every gRPC service of the mesh: availability (no server errors,
        99.9 %) and latency (under 250 ms, 99 %), MESH-sourced, labelled
        ``autoecoops.io/builtin: "true"``, so ``autoecoops up`` watches itself.
        """
        import importlib

        from google.protobuf import duration_pb2

        created = []
        for module in _MESH_MODULES:
            pb_mod = importlib.import_module(module)
            for svc in pb_mod.DESCRIPTOR.services_by_name.values():
                short = svc.full_name.split(".")[1]
                for kind in ("availability", "latency"):
                    ind = pb.Indicator(
                        source=pb.SLI_SOURCE_MESH,
                        mesh=pb.MeshSelector(grpc_service=svc.full_name),
                    )
                    if kind == "availability":
                        ind.ratio.SetInParent()
                    else:
                        ind.threshold.threshold.CopyFrom(duration_pb2.Duration(nanos=250_000_000))
                    slo = pb.Slo(
                        service=short,
                        description=f"{svc.full_name} {kind}, from the mesh's own RPC metrics",
                        objective=0.999 if kind == "availability" else 0.99,
                        indicator=ind,
                        labels={"autoecoops.io/builtin": "true", "sli": kind},
                        owner="autoecoops",
                    )
                    slo_id = f"mesh-{short}-{kind}"
                    if await self.store.find("slos", f"slos/{slo_id}", pb.Slo) is None:
                        with contextlib.suppress(AlreadyExists):  # another replica was first
                            created.append(await self.create(slo_id, slo))
        return created

    async def probe_applications(self) -> None:
        """One probe of each APPLICATION_HEALTH SLO's application: Healthy is a good event."""
        from autoecoops.infra.v1 import infra_pb2

        now = self.clock()
        for slo in await self.store.all("slos", pb.Slo):
            if slo.indicator.source != pb.SLI_SOURCE_APPLICATION_HEALTH:
                continue
            try:
                app = await self.kernel.application(slo.indicator.application)
                healthy = app.status.health.status == infra_pb2.HEALTH_STATUS_CODE_HEALTHY
            except Exception as err:  # an unreachable application counts as down
                log.info("probe of %s failed: %s", slo.indicator.application, err)
                healthy = False
            await self.store.record(slo.name, [(now, int(healthy), 1)], "", now)

    async def budget(self, name: str) -> pb.ErrorBudget:
        """An SLO's error budget now."""
        slo = await self.get(name)
        now = self.clock()
        spec = spec_of(slo, now)
        start = spec.period_start(now)
        span = now - start
        windows = sorted({*burn.windows_of(spec.rows), span, burn.HOUR})
        counts = await self.counts(slo, spec, windows, now)
        state = await self.store.alert_state(slo.name)
        return self._budget_pb(slo, spec, counts, span, start, now, bool(state))

    def _budget_pb(
        self,
        slo: pb.Slo,
        spec: Spec,
        counts: dict[float, burn.Counts],
        span: float,
        start: float,
        now: float,
        firing: bool,
    ) -> pb.ErrorBudget:
        period = counts[span]
        recent = counts.get(burn.HOUR, burn.Counts(0, 0))
        b = burn.budget(
            spec.objective,
            spec.period,
            period,
            burn.burn_rate(recent.bad, recent.total, spec.objective),
        )
        out = pb.ErrorBudget(
            slo=slo.name,
            objective=spec.objective,
            good_count=int(b.good),
            total_count=int(b.total),
            sli=b.sli,
            consumed_fraction=b.consumed,
            remaining_fraction=b.remaining,
            budget_events=b.budget_events,
        )
        out.period.CopyFrom(dur(spec.period))
        out.period_start.CopyFrom(ts(start))
        out.compute_time.CopyFrom(ts(now))
        for w in burn.windows_of(spec.rows):
            c = counts[w]
            out.burn_rates.add(
                window=dur(w),
                rate=burn.burn_rate(c.bad, c.total, spec.objective),
                total_count=int(c.total),
                bad_count=int(c.bad),
            )
        if b.exhaustion_in is not None:
            out.exhaustion_time.CopyFrom(ts(now + b.exhaustion_in))
        if b.total <= 0:
            out.status = pb.ERROR_BUDGET_STATUS_NO_DATA
        elif b.remaining <= 0:
            out.status = pb.ERROR_BUDGET_STATUS_EXHAUSTED
        elif firing:
            out.status = pb.ERROR_BUDGET_STATUS_BURNING
        else:
            out.status = pb.ERROR_BUDGET_STATUS_HEALTHY
        return out

    # -- evaluation -------------------------------------------------------------

    async def evaluate(self, names: Sequence[str] = ()) -> tuple[list[pb.Alert], int]:
        """Evaluate SLOs (all when ``names`` is empty); the alerts that changed state."""
        async with self._lock:
            # One evaluation at a time across replicas: two would both see a row
            # change and both fire (two alerts, two remediations).
            lease = Lease(
                self.store.redis, self.store.evaluation_lease(), self.owner, self.settings.lease
            )
            if not await lease.acquire_within(2 * self.settings.lease.ttl):
                raise Aborted(
                    "another replica has been evaluating SLOs for longer than expected; try again",
                    reason="EVALUATION_BUSY",
                    retry_delay=self.settings.lease.renew,
                )
            # A lost lease does not cancel the evaluation (an EvaluateSlos call would
            # answer CANCELLED): its fenced alert writes are refused instead.
            async with lease.kept(on_lost=lambda: None):
                self._fence = lease.fence
                try:
                    return await self._evaluate(names)
                finally:
                    self._fence = None

    async def _evaluate(self, names: Sequence[str]) -> tuple[list[pb.Alert], int]:
        if names:
            wanted = [resource_name("slos", n, "slos") for n in names]
            slos = await self.store.many("slos", wanted, pb.Slo)
            if len(slos) != len(set(wanted)):
                found = {s.name for s in slos}
                missing = [n for n in wanted if n not in found]
                await self.get(missing[0])  # raises NOT_FOUND naming it
        else:
            slos = await self.store.all("slos", pb.Slo)
        changed: list[pb.Alert] = []
        for slo in slos:
            try:
                changed += await self._evaluate_one(slo)
            except LeaseLost:
                raise  # another replica evaluates now; nothing more may be written
            except Exception as err:  # one broken SLO must not stop the others
                if names:
                    raise
                log.warning("evaluating %s failed: %s", slo.name, err)
        return changed, len(slos)

    async def _evaluate_one(self, slo: pb.Slo) -> list[pb.Alert]:
        now = self.clock()
        spec = spec_of(slo, now)
        if not spec.alerting:
            return []
        with tracer.start_as_current_span("autoops.evaluate", attributes={"slo": slo.name}):
            windows = burn.windows_of(spec.rows)
            counts = await self.counts(slo, spec, windows, now)
            state = await self.store.alert_state(slo.name)
            changed: list[pb.Alert] = []
            alerts: dict[int, pb.Alert] = {}
            for i, alert_name in state.items():
                found = await self.store.find("alerts", alert_name, pb.Alert)
                if found is not None:
                    alerts[i] = found
            fired_at = {i: a.fire_time.ToNanoseconds() / 1e9 for i, a in alerts.items()}
            steps = burn.assess(
                spec.rows,
                spec.objective,
                counts,
                fired_at,
                now,
                resolve_ratio=spec.resolve_ratio,
                min_firing=spec.min_firing,
            )
            for i, step in steps:
                row = spec.rows[i]
                long_b, short_b = step.long_burn, step.short_burn
                alert = alerts.get(i)
                if not step.changed:
                    continue
                if step.firing:
                    alert = self._new_alert(slo, spec, i, row, long_b, short_b, now)
                    await self.store.save_alert(alert, slo.name, i, self._fence)
                    await self._fired(slo, alert, counts, spec, now)
                elif alert is not None:
                    alert.state = pb.ALERT_STATE_RESOLVED
                    alert.long_burn_rate, alert.short_burn_rate = long_b, short_b
                    alert.resolve_time.CopyFrom(ts(now))
                    await self.store.save_alert(alert, slo.name, i, self._fence)
                    await self._resolved(slo, alert)
                if alert is not None:
                    changed.append(alert)
            return changed

    def _new_alert(
        self,
        slo: pb.Slo,
        spec: Spec,
        index: int,
        row: burn.Row,
        long_b: float,
        short_b: float,
        now: float,
    ) -> pb.Alert:
        from autoecoops.platforms.autoops.rules import alert_names

        page, ticket = alert_names(slo)
        window = pb.BurnRateWindow(
            long_window=dur(row.long_window),
            short_window=dur(row.short_window),
            burn_rate=row.burn_rate,
            severity=row.severity,  # type: ignore[arg-type]
        )
        alert = pb.Alert(
            name=f"alerts/{uuid.uuid4().hex[:20]}",
            slo=slo.name,
            service=slo.service,
            severity=row.severity,  # type: ignore[arg-type]
            state=pb.ALERT_STATE_FIRING,
            window=window,
            long_burn_rate=long_b,
            short_burn_rate=short_b,
            summary=(
                f"{slo.name} burning {long_b:.1f}x over {burn.window_label(row.long_window)}"
                f" and {short_b:.1f}x over {burn.window_label(row.short_window)}"
                f" (threshold {row.burn_rate:g}x)"
            ),
            alert_name=page if row.page else ticket,
            trace_id=current_trace_id(),
        )
        alert.fire_time.CopyFrom(ts(now))
        del index
        return alert

    async def _fired(
        self, slo: pb.Slo, alert: pb.Alert, counts: dict[float, burn.Counts], spec: Spec, now: float
    ) -> None:
        start = spec.period_start(now)
        period = (await self.counts(slo, spec, [now - start], now))[now - start]
        remaining = burn.budget(spec.objective, spec.period, period, 0.0).remaining
        citations = await self.kernel.context(
            self.settings.context_namespace,
            f"{slo.service} {slo.description or slo.name} {alert.summary}",
        )
        if citations:
            alert.context.extend(citations)
            await self.store.save_alert(alert, slo.name, _row_of(spec, alert), self._fence)
        await self.kernel.audit(
            "autoops.alert.fire",
            alert.name,
            details={
                "slo": slo.name,
                "alert_name": alert.alert_name,
                "severity": alert.severity,
                "long_burn_rate": alert.long_burn_rate,
                "short_burn_rate": alert.short_burn_rate,
            },
        )
        event = events_pb2.SloBreached(
            slo=slo.name,
            service=slo.service,
            alert=alert.name,
            severity=alert.severity,
            window=alert.window,
            long_burn_rate=alert.long_burn_rate,
            short_burn_rate=alert.short_burn_rate,
            remaining_budget_fraction=remaining,
            fire_time=alert.fire_time,
            alert_name=alert.alert_name,
        )
        await self.kernel.publish(
            event, subject=slo.name, resource=f"autoops/{slo.name}", key=f"fire:{alert.name}"
        )
        for hook in self.on_fire:
            try:
                await hook(slo, alert)
            except Exception:
                log.exception("a runbook trigger for %s failed", alert.name)

    async def _resolved(self, slo: pb.Slo, alert: pb.Alert) -> None:
        await self.kernel.audit(
            "autoops.alert.resolve",
            alert.name,
            details={
                "slo": slo.name,
                "alert_name": alert.alert_name,
                "long_burn_rate": alert.long_burn_rate,
                "short_burn_rate": alert.short_burn_rate,
            },
        )
        event = events_pb2.SloResolved(
            slo=slo.name,
            service=slo.service,
            alert=alert.name,
            severity=alert.severity,
            long_burn_rate=alert.long_burn_rate,
            short_burn_rate=alert.short_burn_rate,
            fire_time=alert.fire_time,
            resolve_time=alert.resolve_time,
        )
        await self.kernel.publish(
            event, subject=slo.name, resource=f"autoops/{slo.name}", key=f"resolve:{alert.name}"
        )

    async def alerts(self, slo: str = "", state: int = 0) -> list[pb.Alert]:
        """Alerts newest first, filtered."""
        names = await self.store.alert_names()
        out = []
        for a in await self.store.many("alerts", names, pb.Alert):
            if slo and a.slo != slo:
                continue
            if state and a.state != state:
                continue
            out.append(a)
        return out

    async def trim(self) -> None:
        """Apply bucket retention to every SLO."""
        now = self.clock()
        for slo in await self.store.all("slos", pb.Slo):
            await self.store.trim(
                slo.name, now, self.settings.fine_retention, self.settings.coarse_retention
            )


#: The generated modules whose services the built-in SLOs watch.
_MESH_MODULES = (
    "autoecoops.auth.v1.auth_pb2",
    "autoecoops.memory.v1.memory_pb2",
    "autoecoops.events.v1.events_pb2",
    "autoecoops.policy.v1.policy_pb2",
    "autoecoops.audit.v1.audit_pb2",
    "autoecoops.infra.v1.infra_pb2",
    "autoecoops.autoops.v1.autoops_pb2",
)


def _row_of(spec: Spec, alert: pb.Alert) -> int:
    lw = alert.window.long_window.ToNanoseconds() / 1e9
    sw = alert.window.short_window.ToNanoseconds() / 1e9
    for i, r in enumerate(spec.rows):
        if abs(r.long_window - lw) < 1e-3 and abs(r.short_window - sw) < 1e-3:
            return i
    return 0
