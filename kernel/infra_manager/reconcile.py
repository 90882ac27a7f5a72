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
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from autoecoops.infra.v1 import events_pb2 as ev
from autoecoops.infra.v1 import infra_pb2
from autoecoops.kernel.infra_manager.cluster import ClusterUnavailable
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
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitError
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, FailedPrecondition, InvalidArgument

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
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        manager.hooks.after_operation = self.trigger
        manager.hooks.changed = self.trigger

    def trigger(self, name: str) -> None:
        """Make ``name`` due now."""
        self._due[name] = 0.0
        self._wake.set()

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
        now = self._clock()
        due = []
        for name in names:
            if name not in self._due:
                # New to this process: spread the first pass over the jitter.
                self._due[name] = now + self._rand() * self.settings.reconcile_jitter
            if self._due[name] <= now:
                due.append(name)

        async def one(name: str) -> None:
            async with self._sem:
                recheck = await self.reconcile(name)
                self._due[name] = self._next(recheck)

        await asyncio.gather(*(one(n) for n in due))
        return len(due)

    async def run(self) -> None:
        """Tick until ``stop``."""
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                log.exception("reconcile tick failed")
            if self._stopping:
                break
            self._wake.clear()
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
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def reconcile(self, name: str, *, refresh: bool = False) -> float | None:
        """Compare one application, record its status, report drift, auto-sync if due.

        Returns when to look again if sooner than the interval (self-heal waits).
        """
        m = self.manager
        try:
            app = await m.store.get(name)
        except AutoEcoOpsError:
            return None  # deleted meanwhile
        await self._expire_stale_operation(name)
        previous = await m.store.status(name)
        try:
            commit = await m.resolve(app, refresh=refresh)
            desired = await m.desired(app, commit)
            known = [r.ref for r in previous.resources] if previous else []
            cmp = await m.compare(app, desired, known)
        except (GitError, ManifestError, ClusterUnavailable) as err:
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
        await m.store.set_status(name, status)
        detect_only = self.settings.detect_only or app.sync_policy.detect_only
        # An application never synced is just OutOfSync; there is no deployment to drift from
        # (detect-only applications are never synced, so for them any difference is drift).
        if last or detect_only:
            await self._report_drift(app, cmp, will_heal=started or decision.recheck_in is not None)
        return decision.recheck_in

    async def _expire_stale_operation(self, name: str) -> None:
        """A RUNNING operation whose lease lapsed died with its process: mark it."""
        m = self.manager
        op = await m.store.operation(name)
        if op is None or op.done or m.running(name) is not None or await m.store.locked_by(name):
            return
        await m.store.set_operation(
            name,
            replace(
                op,
                phase=Phase.ERROR,
                message="interrupted: the process running it stopped",
                end_time=m.clock(),
            ),
        )

    async def _comparison_error(
        self, app: Application, previous: AppStatus | None, err: Exception
    ) -> None:
        if isinstance(err, GitError):
            message = source_error(err, FailedPrecondition, "application.source").message
        elif isinstance(err, ManifestError):
            message = manifest_error(err, FailedPrecondition).message
        else:
            message = f"the cluster could not be read: {err}"
        base = previous or AppStatus()
        status = replace(
            base,
            sync=SyncCode.UNKNOWN,
            reconcile_time=self.manager.clock(),
            conditions=(Condition("ComparisonError", message, self.manager.clock()),),
        )
        await self.manager.store.set_status(app.name, status)

    async def _report_drift(self, app: Application, cmp: Comparison, *, will_heal: bool) -> None:
        m = self.manager
        drifted = cmp.drifted()
        stored = await m.store.drift(app.name)
        if not drifted:
            if stored:
                await m.store.set_drift(app.name, "")
            return
        sig = drift_signature(cmp.desired.revision, drifted)
        if stored == sig:
            return
        await m.store.set_drift(app.name, sig)
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
