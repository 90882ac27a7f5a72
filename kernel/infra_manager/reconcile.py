"""The reconcile loop: compare every application at an interval, report drift, auto-sync.

Each application is due ``interval`` seconds after its last reconcile plus
up to ``jitter`` seconds at random, so many applications spread out instead
of hitting Git and the cluster together. Refresh, a spec change and the end
of an operation make it due at once.

What an automated application does when it is OutOfSync follows Argo CD:
a new Git revision is synced once (a failed automated sync of the same
revision is not repeated; the operation's own retry strategy covers
transient failures); live drift at an already-synced revision is corrected
only with selfHeal, and only ``self_heal_timeout`` after the last sync;
extraneous resources alone trigger nothing unless prune is on; and a prune
that would empty the application needs allowEmpty. Detect-only (per
application or for the whole server) reports drift and never syncs.

Replicas share the work: before reconciling an application a replica takes
its reconcile lease (kernel/mesh/lease.py), so two replicas never reconcile
one application at once, and its writes (status, drift) carry the lease's
fencing token, so a replica paused past its lease cannot overwrite what the
next holder recorded. A replica that finds the lease held skips the
application until its next due time. The interval is shared too: after a
reconcile the replica notes it in Redis for ``interval`` seconds, and the
loop of another replica that finds the note skips the application until it
lapses, so with N replicas an application is still compared once per
interval, not N times (a replica that dies stops renewing its notes, and
the others take its applications over within an interval). What triggers a
reconcile (a Refresh, a spec change, the end of an operation, a live change
seen by the watch) is never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis.exceptions

from autoecoops.infra.v1 import events_pb2 as ev
from autoecoops.infra.v1 import infra_pb2
from autoecoops.kernel.infra_manager.cluster import Change, Cluster, ClusterUnavailable
from autoecoops.kernel.infra_manager.convert import HEALTH, RESOURCE_SYNC, ref_pb, timestamp
from autoecoops.kernel.infra_manager.diff import ResourceDiff
from autoecoops.kernel.infra_manager.health import assess
from autoecoops.kernel.infra_manager.manager import (
    Comparison,
    InfraManager,
    manifest_error,
    principal_of,
    source_error,
)
from autoecoops.kernel.infra_manager.manifests import ManifestError
from autoecoops.kernel.infra_manager.model import (
    AUTOMATED,
    Application,
    AppStatus,
    Condition,
    Phase,
    ResourceSync,
    SyncCode,
)
from autoecoops.kernel.infra_manager.render import ToolMissing
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitError
from autoecoops.kernel.mesh.errors import (
    Aborted,
    AutoEcoOpsError,
    FailedPrecondition,
    InvalidArgument,
)
from autoecoops.kernel.mesh.lease import Fence, Lease, LeaseLost, process_owner

log = logging.getLogger("autoecoops.infra_manager")


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to sync automatically now, and why (or why not)."""

    sync: bool
    reason: str
    #: A condition to show on the application ('' for none).
    condition: str = ""
    #: Seconds until the decision may change (self-heal waiting), else None.
    recheck_in: float | None = None


def decide(
    app: Application,
    sync: SyncCode,
    drifted: Sequence[ResourceDiff],
    desired_resources: int,
    revision: str,
    last: Mapping[str, Any],
    now: float,
    *,
    detect_only: bool = False,
    self_heal_timeout: float = 5.0,
) -> Decision:
    """The automated-sync decision for one reconcile (pure: no I/O)."""
    auto = app.automated
    if auto is None:
        return Decision(False, "automated sync is off")
    if detect_only or app.sync_policy.detect_only:
        return Decision(False, "detect-only: drift is reported, never corrected")
    if sync is not SyncCode.OUT_OF_SYNC:
        return Decision(False, "in sync")
    only_extraneous = all(d.status is ResourceSync.EXTRANEOUS for d in drifted)
    if only_extraneous and not auto.prune:
        return Decision(
            False,
            "only extraneous resources differ and prune is off",
            "PruneSkipped: extraneous resources are kept; enable prune or sync with prune",
        )
    if desired_resources == 0 and auto.prune and not auto.allow_empty:
        return Decision(
            False,
            "refusing to prune every resource",
            "SyncError: Git declares no resources; automated sync will not prune the "
            "application to empty unless allow_empty is set",
        )
    if last.get("revision") == revision:
        if last.get("phase") != Phase.SUCCEEDED.value and last.get("automated"):
            return Decision(
                False,
                "automated sync of this revision already failed",
                f"SyncError: the automated sync of {revision[:12]} failed; push a new commit "
                "or sync manually",
            )
        if last.get("phase") == Phase.SUCCEEDED.value:
            if not auto.self_heal:
                return Decision(False, "live state drifted and selfHeal is off")
            wait = float(last.get("end_time", 0.0)) + self_heal_timeout - now
            if wait > 0:
                return Decision(False, f"self-heal in {wait:.1f}s", recheck_in=wait)
            return Decision(True, "self-heal: correcting live drift")
    return Decision(True, f"automated sync to {revision[:12]}")


def drift_signature(revision: str, drifted: Sequence[ResourceDiff]) -> str:
    """Identifies one drift, so the same drift is reported once."""
    h = hashlib.sha256(revision.encode())
    for d in sorted(drifted, key=lambda d: d.ref):
        h.update(f"\n{d.ref.key}={d.status.value}".encode())
    return h.hexdigest()[:24]


class Reconciler:
    """Runs ``reconcile`` for every due application, bounded in concurrency."""

    def __init__(
        self,
        manager: InfraManager,
        settings: InfraSettings,
        *,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.settings = settings
        self._rand = rand
        self._clock = clock
        self._due: dict[str, float] = {}
        #: Applications being reconciled now, and those triggered meanwhile.
        self._busy: set[str] = set()
        self._again: set[str] = set()
        #: Applications due because something happened, not because the interval passed.
        self._triggered: set[str] = set()
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        manager.hooks.after_operation = self.trigger
        manager.hooks.changed = self.trigger
        #: One watch of the live state per cluster in use (by the cluster object's id).
        self._watches: dict[int, asyncio.Task[None]] = {}
        #: (group, version, kind)s the applications declare: what a watch follows.
        self._kinds: set[tuple[str, str, str]] = set()
        #: Whose reconcile leases this replica takes.
        self.owner = process_owner(f"reconcile-{id(self):x}")
        #: Application -> the fence of the reconcile this replica runs for it now.
        self._fences: dict[str, Fence] = {}

    def trigger(self, name: str) -> None:
        """Make ``name`` due now (again right after the reconcile running for it, if one is)."""
        if name in self._busy:
            self._again.add(name)  # what it compared may predate this change
        self._due[name] = 0.0
        self._triggered.add(name)
        self._wake.set()

    def _watch(self, app: Application) -> None:
        """Follow the live state of ``app``'s cluster (once per cluster, while the loop runs)."""
        if not self.settings.watch or self._task is None or self._stopping:
            return
        cluster = self.manager.clusters(app.destination.cluster)
        if id(cluster) not in self._watches:
            self._watches[id(cluster)] = asyncio.create_task(
                self._follow(cluster), name=f"infra-manager:watch:{cluster.name}"
            )

    async def _follow(self, cluster: Cluster) -> None:
        while not self._stopping:
            try:
                async for change in cluster.changes(
                    lambda: set(self._kinds), lambda: self._stopping
                ):
                    self.on_change(change)
            except NotImplementedError:
                return  # this backend has no watch: the interval does it all
            except Exception:
                log.exception("watching cluster %s failed; watching again", cluster.name)
                await asyncio.sleep(1.0)

    def on_change(self, change: Change) -> None:
        """A live object changed: compare the applications it belongs to now.

        Not while this process runs the application's operation (its own
        writes); the operation's end makes the application due anyway.
        """
        if change.type == "RELIST":
            for name in list(self._due):
                self.trigger(name)
            return
        for name in change.apps:
            if name in self._due and self.manager.running(name) is None:
                self.trigger(name)

    def _next(self, recheck_in: float | None = None) -> float:
        due = (
            self._clock()
            + self.settings.reconcile_interval
            + self._rand() * self.settings.reconcile_jitter
        )
        if recheck_in is not None:
            due = min(due, self._clock() + recheck_in)
        return due

    async def tick(self) -> int:
        """Reconcile every due application once; return how many were."""
        names: list[str] = []
        after = ""
        while True:
            page = await self.manager.store.names(after, 1000)
            names += page
            if len(page) < 1000:
                break
            after = page[-1]
        present = set(names)
        for gone in [n for n in self._due if n not in present]:
            del self._due[gone]
            self._triggered.discard(gone)
        now = self._clock()
        due = []
        for name in names:
            if name not in self._due:
                # New to this process: spread the first pass over the jitter.
                self._due[name] = now + self._rand() * self.settings.reconcile_jitter
            if self._due[name] <= now:
                due.append(name)

        async def one(name: str) -> bool:
            async with self._sem:
                if name in self._triggered:
                    self._triggered.discard(name)
                elif await self._compared_elsewhere(name):
                    return False
                self._busy.add(name)
                try:
                    recheck = await self.reconcile(name)
                finally:
                    self._busy.discard(name)
                if name in self._again:
                    self._again.discard(name)
                    self._due[name] = 0.0
                    self._triggered.add(name)
                    self._wake.set()
                else:
                    self._due[name] = self._next(recheck)
                return True

        return sum(await asyncio.gather(*(one(n) for n in due)))

    async def _compared_elsewhere(self, name: str) -> bool:
        """Whether another replica compared ``name`` less than an interval ago; if so
        it is due again when that replica's note lapses."""
        try:
            note = await self.manager.store.reconciled_by(name)
        except redis.exceptions.RedisError:
            return False  # the reconcile itself reports what is wrong
        if note is None or note[0] == self.owner:
            return False
        self._due[name] = self._clock() + note[1] + self._rand() * self.settings.reconcile_jitter
        return True

    async def run(self) -> None:
        """Tick until ``stop``."""
        while not self._stopping:
            # Cleared before the tick, so a trigger during it is not lost.
            self._wake.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("reconcile tick failed")
            if self._stopping:
                break
            if self._wake.is_set():
                continue
            # asyncio.wait neither raises on timeout nor catches a cancellation;
            # 3.11's wait_for and timeout() can lose a cancel that races the timer.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.settings.tick)
            finally:
                waiter.cancel()

    def start(self) -> None:
        """Run the loop in the background (not when the interval is 0)."""
        if self.settings.reconcile_interval > 0 and self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name="infra-manager:reconcile")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the loop: let the current tick finish (within ``grace``), then cancel."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        watches, self._watches = list(self._watches.values()), {}
        if watches:
            # They end by the flag within a second; cancel only what does not.
            _, late = await asyncio.wait(watches, timeout=grace)
            for w in late:
                w.cancel()
            for w in late:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(w, 1.0)
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def reconcile(
        self, name: str, *, refresh: bool = False, wait: float = 0.0
    ) -> float | None:
        """Compare one application, record its status, report drift, auto-sync if due.

        Only under the application's reconcile lease: when another replica holds
        it, wait up to ``wait`` seconds (a Refresh), else skip (the loop: that
        replica is doing it). Returns when to look again if sooner than the
        interval (self-heal waits).
        """
        lease = Lease(
            self.manager.store.redis,
            self.manager.store.reconcile_lease(name),
            # One owner per reconcile: a Refresh and the loop in one process exclude
            # each other too.
            f"{self.owner}-{uuid.uuid4().hex[:8]}",
            self.settings.lease,
        )
        if not await lease.acquire_within(wait):
            if wait > 0:
                raise Aborted(
                    f"another replica is reconciling application {name!r}; try again",
                    reason="RECONCILE_IN_PROGRESS",
                    retry_delay=self.settings.lease.renew,
                    resource_type="autoecoops.infra.v1.Application",
                    resource_name=name,
                )
            return None
        try:
            # A lost lease does not cancel the reconcile (a Refresh would answer
            # CANCELLED); its fenced writes are refused instead.
            async with lease.kept(on_lost=lambda: None):
                self._fences[name] = lease.fence
                # Logged inside the lease (start after taking it, end before giving it
                # up), so the lines of all replicas show when each one held an
                # application: the e2e test of replicas checks from them that no two
                # reconciles of one application overlapped (as Argo CD's controller
                # logs every reconciliation).
                token = lease.token
                log.info("reconcile of %s started (fence %d)", name, token)
                try:
                    recheck = await self._reconcile(name, refresh)
                    if lease.token:
                        await self._note(name)
                    return recheck
                finally:
                    log.info(
                        "reconcile of %s ended (fence %d%s)",
                        name,
                        token,
                        "" if lease.token else ", lease lost",
                    )
        except LeaseLost:
            log.warning("the reconcile of %s moved to another replica; this one stops", name)
            return None
        finally:
            self._fences.pop(name, None)

    async def _note(self, name: str) -> None:
        """Tell the other replicas' loops that ``name`` was compared (``_compared_elsewhere``)."""
        interval = self.settings.reconcile_interval
        if interval <= 0:
            return
        try:
            await self.manager.store.mark_reconciled(name, self.owner, interval)
        except redis.exceptions.RedisError as err:
            # Only costs a second reconcile by another replica.
            log.warning("noting the reconcile of %s failed: %s", name, err)

    async def _reconcile(self, name: str, refresh: bool) -> float | None:
        m = self.manager
        fence = self._fences.get(name)
        try:
            app = await m.store.get(name)
        except AutoEcoOpsError:
            return None  # deleted meanwhile
        await self._expire_stale_operation(name)
        self._watch(app)
        previous = await m.store.status(name)
        try:
            commit = await m.resolve(app, refresh=refresh)
            desired = await m.desired(app, commit)
            known = [r.ref for r in previous.resources] if previous else []
            cmp = await m.compare(app, desired, known)
            self._kinds.update((m.ref.group, m.ref.version, m.ref.kind) for m in desired.manifests)
        except (GitError, ManifestError, ToolMissing, ClusterUnavailable) as err:
            await self._comparison_error(app, previous, err)
            return None
        last = await m.store.auto(name)
        decision = decide(
            app,
            cmp.sync,
            cmp.drifted(),
            len(desired.resources),
            commit,
            last,
            m.clock(),
            detect_only=self.settings.detect_only,
            self_heal_timeout=self.settings.self_heal_timeout,
        )
        conditions = []
        warning = await m.shared(app, desired)
        if warning is not None:
            conditions.append(warning)
        if decision.condition:
            kind, _, message = decision.condition.partition(": ")
            conditions.append(Condition(kind, message, m.clock()))
        busy = m.running(name) is not None or bool(await m.store.locked_by(name))
        started = False
        if decision.sync and not busy:
            try:
                await m.sync(
                    name,
                    principal_of(app.owner),
                    revision=commit,
                    prune=bool(app.automated and app.automated.prune),
                    initiated_by=AUTOMATED,
                )
                started = True
            except (FailedPrecondition, InvalidArgument) as err:
                kind = (
                    "DestinationNotPermitted"
                    if err.reason == "DESTINATION_NOT_PERMITTED"
                    else "SyncError"
                )
                conditions.append(Condition(kind, err.message, m.clock()))
        status = m.status_of(app, cmp, conditions)
        await m.store.set_status(name, status, fence)
        detect_only = self.settings.detect_only or app.sync_policy.detect_only
        # An application never synced is just OutOfSync; there is no deployment to drift from
        # (detect-only applications are never synced, so for them any difference is drift).
        if last or detect_only:
            await self._report_drift(app, cmp, will_heal=started or decision.recheck_in is not None)
        return decision.recheck_in

    async def _expire_stale_operation(self, name: str) -> None:
        """A RUNNING operation whose lease lapsed died with its process: mark it.

        Checked again in Redis as it is written: an operation started by another
        replica since it was read here is left alone.
        """
        m = self.manager
        op = await m.store.operation(name)
        fence = self._fences.get(name)
        if op is None or op.done or m.running(name) is not None or await m.store.locked_by(name):
            return
        ended = replace(
            op,
            phase=Phase.ERROR,
            message="interrupted: the process running it stopped",
            end_time=m.clock(),
        )
        if fence is None:
            await m.store.set_operation(name, ended)
        else:
            await m.store.expire_operation(name, ended, fence)

    async def _comparison_error(
        self, app: Application, previous: AppStatus | None, err: Exception
    ) -> None:
        if isinstance(err, GitError):
            message = source_error(err, FailedPrecondition, "application.source").message
        elif isinstance(err, ManifestError):
            message = manifest_error(err, FailedPrecondition).message
        elif isinstance(err, ToolMissing):
            message = str(err)
        else:
            message = f"the cluster could not be read: {err}"
        base = previous or AppStatus()
        status = replace(
            base,
            sync=SyncCode.UNKNOWN,
            reconcile_time=self.manager.clock(),
            conditions=(Condition("ComparisonError", message, self.manager.clock()),),
        )
        await self.manager.store.set_status(app.name, status, self._fences.get(app.name))

    async def _report_drift(self, app: Application, cmp: Comparison, *, will_heal: bool) -> None:
        m = self.manager
        drifted = cmp.drifted()
        stored = await m.store.drift(app.name)
        if not drifted:
            if stored:
                await m.store.set_drift(app.name, "", self._fences.get(app.name))
            return
        sig = drift_signature(cmp.desired.revision, drifted)
        if stored == sig:
            return
        await m.store.set_drift(app.name, sig, self._fences.get(app.name))
        auto = app.automated
        heal = bool(
            auto
            and auto.self_heal
            and not app.sync_policy.detect_only
            and not self.settings.detect_only
        )
        event = ev.DriftDetected(
            application=app.name,
            revision=cmp.desired.revision,
            self_heal=heal or will_heal,
            detect_time=timestamp(m.clock()),
        )
        for d in drifted:
            event.drifted_resources.append(
                infra_pb2.ResourceStatus(
                    resource=ref_pb(d.ref),
                    status=RESOURCE_SYNC[d.status],
                    health=infra_pb2.HealthStatus(status=HEALTH[assess(d.raw_live)[0]]),
                    sync_wave=d.manifest.wave if d.manifest else 0,
                )
            )
        op = await m.store.operation(app.name)
        await m.events.publish(
            event, app=app.name, key=f"drift.detected:{app.name}:{op.id if op else '-'}:{sig}"
        )
