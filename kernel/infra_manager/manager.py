"""The GitOps logic behind InfraService: applications, compare, sync, rollback, history.

``InfraManager`` joins the parts: Git (``source``), the manifests, a cluster,
the diff and health rules, the sync engine, the store, and the two sinks
every operation reports to, the event-bus and the audit trail. It is plain
Python over those interfaces, so tests drive it with a real Git repository
and the embedded cluster, without gRPC.

Bad input is refused before anything changes: a spec that does not parse,
a repository or revision that does not resolve, manifests that do not
parse, a namespace the caller may not deploy to, or an unknown history
entry. Sync and Rollback then return at once with a RUNNING operation; the
operation runs in the background, one at a time per application (a lease
in Redis, so two replicas never sync the same application at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from autoecoops.infra.v1 import events_pb2 as ev
from autoecoops.kernel.infra_manager import diff as differ
from autoecoops.kernel.infra_manager.cluster import Cluster, ClusterUnavailable
from autoecoops.kernel.infra_manager.convert import PHASES as _PHASES
from autoecoops.kernel.infra_manager.convert import result_pb as _result_pb
from autoecoops.kernel.infra_manager.convert import timestamp as _ts
from autoecoops.kernel.infra_manager.events import EventSink
from autoecoops.kernel.infra_manager.health import assess, worst
from autoecoops.kernel.infra_manager.manifests import (
    Document,
    Manifest,
    ManifestError,
    build,
    digest,
    parse_files,
    to_documents,
)
from autoecoops.kernel.infra_manager.model import (
    AUTOMATED,
    Application,
    AppStatus,
    Condition,
    Health,
    HistoryEntry,
    Operation,
    Owner,
    Phase,
    Ref,
    ResourceStatus,
    ResourceSync,
    SyncCode,
)
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitError, GitSource
from autoecoops.kernel.infra_manager.store import InfraStore
from autoecoops.kernel.infra_manager.sync import (
    SyncEngine,
    SyncPlan,
    SyncResult,
    Timeouts,
    finished,
)
from autoecoops.kernel.mesh.auth import Authorizer, Principal
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
)
from autoecoops.kernel.mesh.interceptors import current_deadline

log = logging.getLogger("autoecoops.infra_manager")
#: Held in each target namespace (cluster-wide for cluster-scoped objects) to deploy there.
DEPLOY_PERMISSION = "infra.destinations.deploy"
#: The operation lease; renewed while the operation runs.
LOCK_TTL = 60.0
_SYSTEM = Principal("system:infra-manager")


class Auditor(Protocol):
    """Writes rich audit entries (``autoecoops.kernel.mesh.audit.AuditTrail``)."""

    async def record(
        self,
        *,
        type: str,
        action: str,
        resource: str = "",
        outcome: int = ...,
        details: dict[str, Any] | None = None,
        actor: Principal | None = None,
    ) -> int:
        """Append one entry; raise if it cannot be stored."""
        ...


@dataclass(frozen=True, slots=True)
class Desired:
    """The desired state of an application at one commit."""

    revision: str
    manifests: list[Manifest]

    @property
    def resources(self) -> list[Manifest]:
        """The managed resources (hooks excluded)."""
        return [m for m in self.manifests if not m.is_hook]


@dataclass(slots=True)
class Comparison:
    """Desired versus live for one application."""

    desired: Desired
    diffs: list[differ.ResourceDiff]
    live: list[dict[str, Any]]

    @property
    def sync(self) -> SyncCode:
        """Synced only when every resource is."""
        if all(d.status is ResourceSync.SYNCED for d in self.diffs):
            return SyncCode.SYNCED
        return SyncCode.OUT_OF_SYNC

    def drifted(self) -> list[differ.ResourceDiff]:
        """The resources that are not Synced."""
        return [d for d in self.diffs if d.status is not ResourceSync.SYNCED]


@dataclass(frozen=True, slots=True)
class _Job:
    """What one background operation works on."""

    app: Application
    desired: Desired
    op: Operation
    principal: Principal
    #: Identities to sync; None for all.
    only: set[tuple[str, str, str, str]] | None
    #: The history entry being rolled back to, for a rollback.
    rollback: HistoryEntry | None
    #: The revision deployed before a rollback ('' otherwise).
    previous_revision: str


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[Operation]
    op: Operation


@dataclass(slots=True)
class Hooks:
    """Callbacks for the reconciler (set by ``reconcile.Reconciler``)."""

    after_operation: Callable[[str], None] = lambda _name: None
    changed: Callable[[str], None] = lambda _name: None


def _outcome(phase: Phase) -> int:
    from autoecoops.kernel.mesh.audit import FAILURE, SUCCESS

    return SUCCESS if phase is Phase.SUCCEEDED else FAILURE


class InfraManager:
    """Applications and their operations."""

    def __init__(
        self,
        store: InfraStore,
        clusters: Callable[[str], Cluster],
        git: GitSource,
        settings: InfraSettings,
        *,
        events: EventSink,
        audit: Auditor,
        authorizer: Authorizer | None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.clusters = clusters
        self.git = git
        self.settings = settings
        self.events = events
        self.audit = audit
        #: Checks DEPLOY_PERMISSION; None only in tests and benchmarks of the logic.
        self.authorizer = authorizer
        self.clock = clock
        self._sleep = sleep
        self.hooks = Hooks()
        self._running: dict[str, _Running] = {}
        self._docs: OrderedDict[tuple[str, str, str], list[Document]] = OrderedDict()
        self._built: OrderedDict[tuple[str, ...], list[Manifest]] = OrderedDict()

    # -- desired state -------------------------------------------------------------

    async def resolve(self, app: Application, revision: str = "", *, refresh: bool = False) -> str:
        """The commit the source (or ``revision``) names now; GitError if it cannot."""
        return await asyncio.to_thread(
            self.git.resolve,
            app.source.repo_url,
            revision or app.source.target_revision,
            refresh=refresh,
        )

    async def desired(
        self, app: Application, commit: str, docs: list[Document] | None = None
    ) -> Desired:
        """The manifests of ``app`` at ``commit`` (cached per commit); Git/Manifest errors raise."""
        if docs is None:
            key = (app.source.repo_url, commit, app.source.path)
            docs = self._docs.get(key)
            if docs is None:
                files = await asyncio.to_thread(
                    self.git.read, app.source.repo_url, commit, app.source.path
                )
                docs = await asyncio.to_thread(parse_files, files)
                _remember(self._docs, key, docs)
            built_key: tuple[str, ...] = (
                *key,
                app.name,
                app.destination.namespace,
                app.destination.cluster,
            )
            manifests = self._built.get(built_key)
            if manifests is None:
                manifests = await self._build(app, docs)
                _remember(self._built, built_key, manifests)
            return Desired(commit, manifests)
        return Desired(commit, await self._build(app, docs))

    def forget_rendered(self) -> None:
        """Drop every cached parse and render (a hard refresh)."""
        self._docs.clear()
        self._built.clear()

    async def _build(self, app: Application, docs: list[Document]) -> list[Manifest]:
        cluster = self.clusters(app.destination.cluster)
        kinds = {(d.obj["apiVersion"].rpartition("/")[0], d.obj["kind"]) for d in docs}
        scope = {gk: await cluster.namespaced(*gk) for gk in kinds}
        return build(docs, app.name, app.destination.namespace, lambda g, k: scope[(g, k)])

    # -- compare -------------------------------------------------------------------

    async def compare(
        self, app: Application, desired: Desired, known: Iterable[Ref] = ()
    ) -> Comparison:
        """Diff ``desired`` against the live state (one dry-run per existing resource)."""
        cluster = self.clusters(app.destination.cluster)
        refs = [m.ref for m in desired.manifests]
        kinds = {(r.group, r.version, r.kind) for r in [*refs, *known]}
        live: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for obj in await cluster.list_app(app.name, kinds):
            live[differ.ident(Ref.of(obj))] = obj
        # Declared objects the application does not (yet) track, e.g. ones to adopt.
        unlisted = [r for r in refs if differ.ident(r) not in live]
        for ref, found in zip(unlisted, await cluster.get_many(unlisted), strict=True):
            if found is not None:
                live[differ.ident(ref)] = found
        existing = [m for m in desired.resources if differ.ident(m.ref) in live]
        predicted = await cluster.predict_many(
            [m.obj for m in existing], [live[differ.ident(m.ref)] for m in existing]
        )
        by_ref = {m.ref: p for m, p in zip(existing, predicted, strict=True) if p is not None}
        result = differ.diff_app(desired.manifests, live, by_ref, app.name, app.ignore_differences)
        return Comparison(desired, result, list(live.values()))

    def status_of(
        self, app: Application, cmp: Comparison, conditions: Sequence[Condition] = ()
    ) -> AppStatus:
        """The application status a comparison shows (sync and health kept apart)."""
        resources = []
        healths = []
        for d in cmp.diffs:
            health, message = assess(d.raw_live)
            if d.status is not ResourceSync.EXTRANEOUS:
                healths.append((health, message, d.ref))
            resources.append(
                ResourceStatus(
                    d.ref, d.status, health, message, False, d.manifest.wave if d.manifest else 0
                )
            )
        overall = worst(h for h, _m, _r in healths)
        why = next(
            (
                f"{r}: {m or h.value}"
                for h, m, r in healths
                if h is overall and h is not Health.HEALTHY
            ),
            "",
        )
        return AppStatus(
            sync=cmp.sync,
            revision=cmp.desired.revision,
            health=overall,
            health_message=why,
            resources=tuple(resources),
            reconcile_time=self.clock(),
            conditions=tuple(conditions),
        )

    # -- permission ----------------------------------------------------------------

    async def check_deploy(
        self,
        principal: Principal,
        namespaces: Iterable[str],
        error: type[AutoEcoOpsError],
        field_name: str,
    ) -> None:
        """Raise ``error`` naming every namespace (or cluster scope) the principal may not deploy to."""
        if self.authorizer is None:
            return
        denied = []
        for ns in sorted(set(namespaces)):
            try:
                await self.authorizer.check(principal, DEPLOY_PERMISSION, ns)
            except PermissionDenied:
                denied.append(ns or "(cluster-scoped resources)")
        if denied:
            raise error(
                f"{principal.subject} may not deploy to {', '.join(denied)}: "
                f"{DEPLOY_PERMISSION} is needed there",
                reason="DESTINATION_NOT_PERMITTED",
                metadata={"permission": DEPLOY_PERMISSION, "namespaces": ",".join(denied)},
                field_violations=[
                    FieldViolation(field_name, f"{principal.subject} may not deploy to {ns}")
                    for ns in denied
                ],
            )

    @staticmethod
    def target_namespaces(desired: Desired, app: Application) -> set[str]:
        """Where the manifests deploy: each namespace, '' for cluster-scoped objects."""
        out = {app.destination.namespace}
        out.update(m.ref.namespace for m in desired.manifests)
        return out

    # -- applications --------------------------------------------------------------

    async def validate_source(self, app: Application, principal: Principal) -> Desired:
        """Resolve and parse the source as a Create/Update would; INVALID_ARGUMENT naming the field."""
        try:
            commit = await self.resolve(app, refresh=True)
            desired = await self.desired(app, commit)
        except GitError as err:
            raise source_error(err, InvalidArgument, "application.source") from None
        except ManifestError as err:
            raise manifest_error(err, InvalidArgument) from None
        await self.check_deploy(
            principal,
            self.target_namespaces(desired, app),
            InvalidArgument,
            "application.destination.namespace",
        )
        return desired

    async def create(self, app: Application, principal: Principal) -> Application:
        """Validate everything, then store; nothing is stored when anything is wrong."""
        app.validate()
        await self.validate_source(app, principal)
        now = self.clock()
        app = replace(app, create_time=now, update_time=now, owner=owner_of(principal))
        await self.store.create(app)
        self.hooks.changed(app.name)
        return app

    async def update(self, app: Application, principal: Principal) -> Application:
        """Replace the spec (the caller merged the field mask); validated as on create."""
        current = await self.store.get(app.name)
        app = replace(
            app,
            create_time=current.create_time,
            update_time=self.clock(),
            owner=owner_of(principal),
        )
        app.validate()
        await self.validate_source(app, principal)
        await self.store.put(app)
        self.hooks.changed(app.name)
        return app

    async def delete(self, name: str, cascade: bool, principal: Principal) -> list[Ref]:
        """Delete the application; with ``cascade`` its live resources first (audited as a prune)."""
        app = await self.store.get(name)
        if name in self._running:
            raise FailedPrecondition(
                f"application {name!r} has an operation running; wait for it to finish",
                reason="OPERATION_IN_PROGRESS",
            )
        pruned: list[Ref] = []
        if cascade:
            cluster = self.clusters(app.destination.cluster)
            kinds = {(r.ref.group, r.ref.version, r.ref.kind) for r in (await self._known(name))}
            for obj in await cluster.list_app(name, kinds):
                ref = Ref.of(obj)
                if await cluster.delete(ref):
                    pruned.append(ref)
            await self.audit.record(
                type="infra.prune",
                action="cascade-delete",
                resource=f"infra/applications/{name}",
                details={"pruned": [str(r) for r in pruned]},
                actor=principal,
            )
        await self.store.delete(name)
        return pruned

    async def _known(self, name: str) -> tuple[ResourceStatus, ...]:
        status = await self.store.status(name)
        return status.resources if status else ()

    # -- diff and refresh --------------------------------------------------------

    async def _requested(
        self, app: Application, revision: str, *, refresh: bool = False
    ) -> Desired:
        """The desired state a request asks for: its own ``revision`` that does not
        resolve is INVALID_ARGUMENT; a broken source or manifests, FAILED_PRECONDITION."""
        try:
            commit = await self.resolve(app, revision, refresh=refresh)
            return await self.desired(app, commit)
        except GitError as err:
            if revision and err.kind == "revision":
                raise source_error(err, InvalidArgument, "") from None
            raise source_error(err, FailedPrecondition, "application.source") from None
        except ManifestError as err:
            raise manifest_error(err, FailedPrecondition) from None

    async def diff(self, name: str, revision: str = "") -> Comparison:
        """Compare Git at ``revision`` (default: the target) with the live state."""
        app = await self.store.get(name)
        desired = await self._requested(app, revision)
        return await self.compare(app, desired, (r.ref for r in await self._known(name)))

    # -- operations ------------------------------------------------------------------

    def running(self, name: str) -> Operation | None:
        """The operation running in this process for ``name``, if any."""
        run = self._running.get(name)
        return run.op if run else None

    async def wait(self, name: str) -> Operation | None:
        """Wait for this process's running operation of ``name`` (tests, CLI)."""
        run = self._running.get(name)
        if run is None:
            return await self.store.operation(name)
        return await asyncio.shield(run.task)

    async def sync(
        self,
        name: str,
        principal: Principal,
        *,
        revision: str = "",
        prune: bool = False,
        dry_run: bool = False,
        only: Sequence[Ref] = (),
        initiated_by: str = "",
    ) -> Operation:
        """Start a sync; refuse (and change nothing) when the input or state is wrong."""
        app = await self.store.get(name)
        # A person's sync fetches first; the reconciler's has just compared.
        desired = await self._requested(app, revision, refresh=not initiated_by)
        await self.check_deploy(
            principal, self.target_namespaces(desired, app), FailedPrecondition, "name"
        )
        selected = None
        if only:
            declared = {differ.ident(m.ref) for m in desired.manifests}
            selected = {differ.ident(r) for r in only}
            unknown = [r for r in only if differ.ident(r) not in declared]
            if unknown and not prune:
                raise InvalidArgument(
                    f"{len(unknown)} selected resources are not in the manifests",
                    reason="RESOURCE_NOT_DECLARED",
                    field_violations=[
                        FieldViolation(
                            f"resources[{list(only).index(r)}]", f"{r} is not declared in Git"
                        )
                        for r in unknown
                    ],
                )
        return await self._start(
            app,
            desired,
            principal,
            initiated_by=initiated_by or principal.subject,
            prune=prune,
            dry_run=dry_run,
            only=selected,
        )

    async def rollback(
        self,
        name: str,
        history_id: int,
        principal: Principal,
        *,
        prune: bool = False,
        dry_run: bool = False,
        disable_auto_sync: bool = False,
    ) -> Operation:
        """Re-apply the manifests of history entry ``history_id``."""
        app = await self.store.get(name)
        entries = await self.store.history(name)
        entry = next((e for e in entries if e.id == history_id), None)
        if entry is None:
            known = ", ".join(str(e.id) for e in entries) or "none"
            raise InvalidArgument(
                f"application {name!r} has no history entry {history_id} (kept: {known})",
                reason="HISTORY_NOT_FOUND",
                metadata={"history_id": str(history_id)},
                field_violations=[FieldViolation("history_id", "no such history entry")],
            )
        if app.automated is not None and not dry_run and not disable_auto_sync:
            raise FailedPrecondition(
                f"application {name!r} has automated sync on, which would undo the rollback; "
                "turn it off or set disable_auto_sync",
                reason="AUTO_SYNC_ENABLED",
                field_violations=[
                    FieldViolation("disable_auto_sync", "set it to turn automated sync off first")
                ],
            )
        docs = await self.store.manifests(name, entry.manifest_digest)
        if docs is None:
            raise FailedPrecondition(
                f"the manifests of history entry {history_id} are no longer stored",
                reason="HISTORY_MANIFESTS_GONE",
            )
        try:
            desired = await self.desired(app, entry.revision, docs)
        except ManifestError as err:
            raise manifest_error(err, FailedPrecondition) from None
        await self.check_deploy(
            principal, self.target_namespaces(desired, app), FailedPrecondition, "name"
        )
        if disable_auto_sync and app.automated is not None and not dry_run:
            if name in self._running or await self.store.locked_by(name):
                raise _in_progress(name)
            app = app.without_auto_sync()
            app = replace(app, update_time=self.clock())
            await self.store.put(app)
        previous = await self.store.history(name)
        return await self._start(
            app,
            desired,
            principal,
            initiated_by=principal.subject,
            prune=prune,
            dry_run=dry_run,
            rollback=entry,
            previous_revision=previous[0].revision if previous else "",
        )

    async def _start(
        self,
        app: Application,
        desired: Desired,
        principal: Principal,
        *,
        initiated_by: str,
        prune: bool,
        dry_run: bool,
        only: set[tuple[str, str, str, str]] | None = None,
        rollback: HistoryEntry | None = None,
        previous_revision: str = "",
    ) -> Operation:
        op = Operation(
            id=uuid.uuid4().hex[:16],
            phase=Phase.RUNNING,
            revision=desired.revision,
            initiated_by=initiated_by,
            start_time=self.clock(),
            message="waiting to start",
            dry_run=dry_run,
            prune=prune,
            rollback_history_id=rollback.id if rollback else 0,
        )
        if app.name in self._running or not await self.store.lock(app.name, op.id, LOCK_TTL):
            raise _in_progress(app.name)
        try:
            await self.store.set_operation(app.name, op)
        except BaseException:
            await self.store.unlock(app.name, op.id)
            raise
        task = asyncio.create_task(
            self._operate(_Job(app, desired, op, principal, only, rollback, previous_revision)),
            name=f"infra-manager:{app.name}:{op.id}",
        )
        self._running[app.name] = _Running(task, op)
        task.add_done_callback(functools.partial(self._done, app.name, op.id))
        return op

    def _done(self, name: str, op_id: str, _task: object = None) -> None:
        run = self._running.get(name)
        if run is not None and run.op.id == op_id:
            del self._running[name]
        self.hooks.after_operation(name)

    async def _operate(self, job: _Job) -> Operation:
        # The request's deadline was copied into this task; the operation outlives it.
        current_deadline.set(None)
        name, op = job.app.name, job.op
        lease = asyncio.create_task(self._keep_lease(name, op.id))
        try:
            return await self._attempts(job)
        except Exception as err:  # a bug must not leave the operation RUNNING for ever
            log.exception("operation %s of %s failed unexpectedly", op.id, name)
            op = replace(
                op, phase=Phase.ERROR, message=f"internal error: {err}", end_time=self.clock()
            )
            with contextlib.suppress(Exception):
                await self.store.set_operation(name, op)
            return op
        finally:
            lease.cancel()
            with contextlib.suppress(Exception):
                await self.store.unlock(name, op.id)

    async def _keep_lease(self, name: str, op_id: str) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            with contextlib.suppress(Exception):
                await self.store.renew(name, op_id, LOCK_TTL)

    async def _attempts(self, job: _Job) -> Operation:
        app, desired, op, only = job.app, job.desired, job.op, job.only
        principal, rollback, previous_revision = job.principal, job.rollback, job.previous_revision
        name = app.name
        cluster = self.clusters(app.destination.cluster)
        engine = SyncEngine(
            cluster,
            Timeouts(
                self.settings.wave_timeout, self.settings.hook_timeout, self.settings.health_poll
            ),
            sleep=self._sleep,
        )
        await self.events.publish(
            ev.SyncStarted(
                application=name,
                operation_id=op.id,
                revision=op.revision,
                dry_run=op.dry_run,
                initiated_by=op.initiated_by,
                start_time=_ts(op.start_time),
            ),
            app=name,
            key=f"sync.started:{name}:{op.id}",
        )
        retry = app.sync_policy.retry
        while True:
            live = await self._live(app, desired)
            plan = SyncPlan(name, desired.manifests, live, op.prune, op.dry_run, only)

            async def progress(results: list[Any], op: Operation = op) -> None:
                await self.store.set_operation(
                    name, replace(op, message="running", results=tuple(results))
                )

            result = await engine.run(plan, progress)
            will_retry = (
                result.phase is not Phase.SUCCEEDED
                and not op.dry_run
                and retry is not None
                and retry.allows(op.retry_count)
            )
            if result.phase is Phase.SUCCEEDED or not will_retry:
                break
            await self._failed_event(name, op, result, will_retry=True)
            delay = retry.backoff.delay(op.retry_count + 1)  # type: ignore[union-attr]
            op = replace(
                op,
                retry_count=op.retry_count + 1,
                results=tuple(result.results),
                message=f"{result.message}; retrying in {delay:g}s (retry {op.retry_count + 1})",
            )
            await self.store.set_operation(name, op)
            await self._sleep(delay)
        op = finished(op, result, self.clock())
        history_id = 0
        if result.phase is Phase.SUCCEEDED and not op.dry_run:
            entry = await self.store.add_history(
                name,
                HistoryEntry(
                    0,
                    op.revision,
                    digest(desired.manifests),
                    op.end_time,
                    op.initiated_by,
                    app.source,
                ),
                to_documents(desired.manifests),
                app.history_limit(self.settings.default_history_limit),
            )
            history_id = entry.id
        await self.store.set_operation(name, op)
        if not op.dry_run:
            await self.store.set_auto(
                name,
                {
                    "revision": op.revision,
                    "phase": op.phase.value,
                    "end_time": op.end_time,
                    "automated": op.initiated_by == AUTOMATED,
                },
            )
        if result.phase is Phase.SUCCEEDED:
            await self.events.publish(
                ev.SyncSucceeded(
                    application=name,
                    operation_id=op.id,
                    revision=op.revision,
                    dry_run=op.dry_run,
                    resource_count=result.applied,
                    history_id=history_id,
                    end_time=_ts(op.end_time),
                ),
                app=name,
                key=f"sync.succeeded:{name}:{op.id}",
            )
        else:
            await self._failed_event(name, op, result, will_retry=False)
        if rollback is not None:
            await self.events.publish(
                ev.RollbackCompleted(
                    application=name,
                    operation_id=op.id,
                    history_id=rollback.id,
                    revision=op.revision,
                    previous_revision=previous_revision,
                    phase=_PHASES[op.phase],
                    message=op.message,
                    end_time=_ts(op.end_time),
                ),
                app=name,
                key=f"rollback.completed:{name}:{op.id}",
            )
        await self._audit(app, op, result, principal, rollback, history_id)
        return op

    async def _live(self, app: Application, desired: Desired) -> list[dict[str, Any]]:
        cluster = self.clusters(app.destination.cluster)
        known = [r.ref for r in await self._known(app.name)]
        kinds = {
            (r.group, r.version, r.kind) for r in [*(m.ref for m in desired.manifests), *known]
        }
        try:
            return await cluster.list_app(app.name, kinds)
        except ClusterUnavailable:
            return []  # nothing is pruned when the cluster cannot be listed

    async def _failed_event(
        self, name: str, op: Operation, result: SyncResult, *, will_retry: bool
    ) -> None:
        await self.events.publish(
            ev.SyncFailed(
                application=name,
                operation_id=op.id,
                revision=op.revision,
                phase=_PHASES[result.phase],
                message=result.message,
                failed_resources=[_result_pb(r) for r in result.failed],
                will_retry=will_retry,
                end_time=_ts(self.clock()),
            ),
            app=name,
            key=f"sync.failed:{name}:{op.id}:{op.retry_count}",
        )

    async def _audit(
        self,
        app: Application,
        op: Operation,
        result: SyncResult,
        principal: Principal,
        rollback: HistoryEntry | None,
        history_id: int,
    ) -> None:
        actor = principal if op.initiated_by != AUTOMATED else _SYSTEM
        resource = f"infra/applications/{app.name}"
        details: dict[str, Any] = {
            "operation_id": op.id,
            "revision": op.revision,
            "phase": op.phase.value,
            "message": op.message,
            "initiated_by": op.initiated_by,
            "dry_run": op.dry_run,
            "applied": result.applied,
            "failed": [str(r.ref) for r in result.failed],
            "history_id": history_id,
            "retries": op.retry_count,
        }
        try:
            if rollback is not None:
                await self.audit.record(
                    type="infra.rollback",
                    action="rollback",
                    resource=resource,
                    outcome=_outcome(op.phase),
                    details={**details, "rollback_history_id": rollback.id},
                    actor=actor,
                )
            else:
                await self.audit.record(
                    type="infra.sync",
                    action="sync",
                    resource=resource,
                    outcome=_outcome(op.phase),
                    details=details,
                    actor=actor,
                )
            if result.pruned:
                await self.audit.record(
                    type="infra.prune",
                    action="prune",
                    resource=resource,
                    outcome=_outcome(op.phase),
                    details={"operation_id": op.id, "pruned": [str(r) for r in result.pruned]},
                    actor=actor,
                )
        except Exception:
            # The operation has already changed the cluster; what we can do is shout.
            log.exception("could not audit operation %s of %s", op.id, app.name)

    # -- reading ----------------------------------------------------------------------

    async def history(self, name: str) -> list[HistoryEntry]:
        """The application's history, newest first (NOT_FOUND for an unknown application)."""
        await self.store.get(name)
        return await self.store.history(name)

    async def close(self) -> None:
        """Cancel running operations (they stay RUNNING in the store until the lease lapses)."""
        tasks = [r.task for r in self._running.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any, size: int = 256) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _in_progress(name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"another operation is already in progress for application {name!r}",
        reason="OPERATION_IN_PROGRESS",
        resource_type="autoecoops.infra.v1.Application",
        resource_name=name,
    )


def owner_of(principal: Principal) -> Owner:
    """The owner record of a principal (whose authority automated syncs use)."""
    return Owner(
        principal.subject, principal.issuer, tuple(principal.roles), tuple(principal.groups)
    )


def principal_of(owner: Owner) -> Principal:
    """The principal an owner record stands for."""
    return Principal(owner.subject, owner.issuer, owner.roles, owner.groups)


_SOURCE_REASONS = {
    "url": ("REPOSITORY_URL_INVALID", "repo_url"),
    "unreachable": ("REPOSITORY_UNREACHABLE", "repo_url"),
    "revision": ("REVISION_NOT_FOUND", "target_revision"),
    "path": ("PATH_NOT_FOUND", "path"),
}


def source_error(err: GitError, error: type[AutoEcoOpsError], prefix: str) -> AutoEcoOpsError:
    """The status for a source that cannot be read, naming the field at fault.

    ``prefix`` '' means the request's own ``revision`` field is at fault.
    """
    reason, leaf = _SOURCE_REASONS[err.kind]
    field_name = f"{prefix}.{leaf}" if prefix else "revision"
    return error(
        err.message, reason=reason, field_violations=[FieldViolation(field_name, err.message)]
    )


def manifest_error(err: ManifestError, error: type[AutoEcoOpsError]) -> AutoEcoOpsError:
    """The status for manifests that do not parse: one violation per file and document."""
    return error(
        str(err),
        reason="INVALID_MANIFESTS",
        metadata={"count": str(len(err.violations))},
        field_violations=err.violations,
    )
