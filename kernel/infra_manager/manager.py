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
in Redis, so two replicas never sync the same application at once; its
writes carry the lease's fencing token, so an operation whose lease moved
cannot record anything more).
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
from autoecoops.kernel.infra_manager.render import Renderer, ToolMissing, Tools
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
from autoecoops.kernel.mesh.lease import Lease

log = logging.getLogger("autoecoops.infra_manager")
#: Held in each target namespace (cluster-wide for cluster-scoped objects) to deploy there.
DEPLOY_PERMISSION = "infra.destinations.deploy"
#: Seconds a terminate request waits for the process running the operation to see it.
TERMINATE_TTL = 60.0
#: How often a running operation looks for a terminate request from another replica.
TERMINATE_POLL = 0.5
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


@dataclass(frozen=True, slots=True)
class Rendered:
    """One rendered object as GetManifests shows it."""

    ref: Ref
    #: The file it came from (for Helm, the template).
    source_path: str
    #: Its position among that file's documents, from 0.
    document_index: int
    #: The 1-based line where it starts; 0 when the file's lines do not map to it.
    line: int
    #: The YAML as written in Git or as rendered.
    yaml: str


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
    #: The operation's lease (its owner is the operation id).
    lease: Lease


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
        #: Operation id -> who terminated it, while its task is being cancelled.
        self._terminated: dict[str, str] = {}
        #: Operations recording their terminated end (not to be cancelled again).
        self._ending: set[str] = set()
        self.renderer = Renderer(
            git,
            Tools(settings.helm, settings.kubectl, settings.kustomize, settings.render_timeout),
        )
        self._docs: OrderedDict[tuple[str, ...], list[Document]] = OrderedDict()
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
            key = self._docs_key(app, commit)
            docs = await self.documents(app, commit)
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

    @staticmethod
    def _docs_key(app: Application, commit: str) -> tuple[str, ...]:
        # Everything a render depends on: Helm's release name and namespace
        # default to the application's name and destination.
        s = app.source
        return (
            s.repo_url,
            commit,
            s.path,
            repr(s.helm),
            repr(s.kustomize),
            app.name if s.helm or not s.kustomize else "",
            app.destination.namespace,
            app.destination.cluster,
        )

    async def documents(self, app: Application, commit: str) -> list[Document]:
        """The source's documents at ``commit``, as written or rendered (cached per commit).

        ``ToolMissing`` when the source needs a tool this server does not have.
        """
        key = self._docs_key(app, commit)
        docs = self._docs.get(key)
        if docs is None:
            version = await self.clusters(app.destination.cluster).server_version()
            docs = await asyncio.to_thread(
                self.renderer.documents,
                app.source,
                commit,
                release=app.name,
                namespace=app.destination.namespace,
                kube_version=version,
            )
            _remember(self._docs, key, docs)
        return docs

    async def manifests(self, name: str, revision: str = "") -> tuple[str, list[Rendered]]:
        """The rendered manifests of ``name`` at ``revision`` (default: the target), in source order.

        One entry per object that would be deployed (hooks included; ``Skip``
        ones left out, as they never are), its identity as deployed (the
        destination namespace filled in) and its YAML as the source produced it.
        """
        app = await self.store.get(name)
        desired = await self._requested(app, revision)
        by_where = {d.where: d for d in await self.documents(app, desired.revision)}
        out = []
        for m in desired.manifests:
            doc = by_where.get(m.where)
            if doc is None:  # cannot happen: every manifest is built from a document
                continue
            out.append(Rendered(m.ref, doc.path, doc.index, doc.line, doc.text))
        return desired.revision, out

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

    async def shared(self, app: Application, desired: Desired) -> Condition | None:
        """A SharedResourceWarning when other applications declare some of the same objects."""
        idents = {"/".join(differ.ident(m.ref)): m.ref for m in desired.resources}
        shared = await self.store.declare(
            app.name, self.clusters(app.destination.cluster).name, idents
        )
        if not shared:
            return None
        parts = [
            f"{idents[i]} is part of applications {' and '.join(sorted([app.name, *others]))}"
            for i, others in sorted(shared.items())
        ]
        more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
        return Condition("SharedResourceWarning", "; ".join(parts[:5]) + more, self.clock())

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
        except ToolMissing as err:
            raise tool_error(err) from None
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
        desired = await self.validate_source(app, principal)
        now = self.clock()
        app = replace(app, create_time=now, update_time=now, owner=owner_of(principal))
        await self.store.create(app)
        # Declared from the start, so an application sharing an object hears of it.
        await self.shared(app, desired)
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
        desired = await self.validate_source(app, principal)
        await self.store.put(app)
        await self.shared(app, desired)
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
        await self.store.undeclare(name, self.clusters(app.destination.cluster).name)
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
        except ToolMissing as err:
            raise tool_error(err) from None

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
        if revision and not initiated_by and not dry_run and app.automated is not None:
            # The next automated sync would undo it within a tick (Argo CD refuses it too).
            target = (await self._requested(app, "")).revision
            if desired.revision != target:
                wanted = app.source.target_revision or "HEAD"
                raise FailedPrecondition(
                    f"cannot sync application {name!r} to {revision}: automated sync is on "
                    f"and keeps it at {wanted} ({target[:12]}); turn automated sync off first",
                    reason="AUTO_SYNC_ENABLED",
                    metadata={"target_revision": wanted, "revision": revision},
                    field_violations=[
                        FieldViolation(
                            "revision", f"differs from the auto-synced target revision {wanted}"
                        )
                    ],
                )
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
            if not await self._idle(name, lambda: self.store.locked_by(name)):
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
        lease = Lease(
            self.store.redis, self.store.operation_lease(app.name), op.id, self.settings.lease
        )
        if not await self._idle(app.name, lease.acquire, free=True):
            raise _in_progress(app.name)
        try:
            await self.store.set_operation(app.name, op, lease.fence)
        except BaseException:
            await lease.release()
            raise
        job = _Job(app, desired, op, principal, only, rollback, previous_revision, lease)
        task = asyncio.create_task(
            self._operate(job),
            name=f"infra-manager:{app.name}:{op.id}",
        )
        self._running[app.name] = _Running(task, op)
        task.add_done_callback(functools.partial(self._done, app.name, op.id))
        return op

    async def _idle(
        self, name: str, probe: Callable[[], Awaitable[Any]], *, free: bool = False
    ) -> bool:
        """Whether no operation of ``name`` runs: ``probe`` is ``lease.acquire`` (``free``:
        it answers True when the lease was taken) or ``locked_by`` (it answers the holder).

        An operation records its end and then gives up its lease (a Redis
        round trip later, in whichever replica ran it). A caller that saw the
        end (GetApplication, iaops waiting for its sync) and at once asks for
        the next operation would be refused as "in progress" for that moment;
        so while the stored operation has ended, wait for the release (up to
        ``ENDING_GRACE`` seconds) instead of refusing.
        """
        deadline = time.monotonic() + ENDING_GRACE
        while True:
            if name not in self._running and bool(await probe()) == free:
                return True
            stored = await self.store.operation(name)
            ended = stored is not None and stored.phase not in (Phase.RUNNING, Phase.TERMINATING)
            if not ended or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    def _done(self, name: str, op_id: str, _task: object = None) -> None:
        run = self._running.get(name)
        if run is not None and run.op.id == op_id:
            del self._running[name]
        self.hooks.after_operation(name)

    async def _operate(self, job: _Job) -> Operation:
        # The request's deadline was copied into this task; the operation outlives it.
        current_deadline.set(None)
        # The lease is renewed while the operation runs and released after its end
        # is recorded. If it is lost (this process was paused past its TTL, or
        # Redis was unreachable that long) the operation is cancelled: another
        # replica may be syncing now, and every write this one would still make
        # is refused by the fence anyway.
        async with job.lease.kept():
            # Logged while the lease is held (the end before it is released), so the
            # lines of all replicas show that operations of one application never
            # overlap (the e2e test of replicas checks it from them).
            token = job.lease.token
            log.info("operation %s of %s started (fence %d)", job.op.id, job.app.name, token)
            try:
                return await self._operate_held(job)
            finally:
                log.info(
                    "operation %s of %s ended (fence %d%s)",
                    job.op.id,
                    job.app.name,
                    token,
                    "" if job.lease.token else ", lease lost",
                )

    async def _operate_held(self, job: _Job) -> Operation:
        name, op = job.app.name, job.op
        watch = asyncio.create_task(self._watch_terminate(name, op.id))
        try:
            return await self._attempts(job)
        except asyncio.CancelledError:
            by = self._terminated.get(op.id)
            if by is None:
                raise  # the server is stopping, not a user's terminate
            self._ending.add(op.id)  # no more cancels while the end is recorded
            task = asyncio.current_task()
            while task is not None and task.cancelling():
                task.uncancel()
            stored = await self.store.operation(name)
            current = stored if stored is not None and stored.id == op.id else op
            # What was applied stays applied; SyncFail hooks are not run (Argo CD's terminate).
            result = SyncResult(Phase.FAILED, f"terminated by {by}", list(current.results))
            return await self._finish(job, replace(current, phase=Phase.RUNNING), result)
        except Exception as err:  # a bug must not leave the operation RUNNING for ever
            log.exception("operation %s of %s failed unexpectedly", op.id, name)
            op = replace(
                op, phase=Phase.ERROR, message=f"internal error: {err}", end_time=self.clock()
            )
            with contextlib.suppress(Exception):
                await self.store.set_operation(name, op, job.lease.fence)
            return op
        finally:
            watch.cancel()
            self._terminated.pop(op.id, None)
            self._ending.discard(op.id)

    async def terminate(self, name: str, principal: Principal) -> Operation:
        """Stop the running operation of ``name``; it ends FAILED "terminated by <caller>".

        Works across replicas: the request is stored beside the lease, and the
        process running the operation watches for it.
        """
        await self.store.get(name)
        run = self._running.get(name)
        holder = await self.store.locked_by(name)
        op_id = run.op.id if run is not None else holder
        stored = await self.store.operation(name)
        # An operation whose end is already stored is over, though its lease
        # is released a moment later.
        if not op_id or (stored is not None and stored.id == op_id and stored.done):
            raise FailedPrecondition(
                f"application {name!r} has no operation running",
                reason="NO_OPERATION_RUNNING",
                resource_type="autoecoops.infra.v1.Application",
                resource_name=name,
            )
        base = stored if stored is not None and stored.id == op_id else (run.op if run else None)
        if base is None:
            base = Operation(op_id, Phase.RUNNING, "", "", self.clock())
        stopping = replace(
            base, phase=Phase.TERMINATING, message=f"terminating (requested by {principal.subject})"
        )
        await self.store.set_operation(name, stopping)
        await self.store.request_terminate(name, op_id, principal.subject, TERMINATE_TTL)
        if run is not None:
            self._stop(name, op_id, principal.subject)
        return stopping

    def _stop(self, name: str, op_id: str, by: str) -> None:
        run = self._running.get(name)
        if (
            run is not None
            and run.op.id == op_id
            and op_id not in self._terminated
            and op_id not in self._ending
        ):
            self._terminated[op_id] = by
            run.task.cancel()

    async def _watch_terminate(self, name: str, op_id: str) -> None:
        """Stop this operation when another replica stored a terminate request for it.

        Once terminated it cancels again each poll until the operation ends: a
        library that swallows one cancellation (a Redis call caught mid-read)
        must not keep the operation running until its wave times out.
        """
        while True:
            await asyncio.sleep(TERMINATE_POLL)
            if op_id in self._ending:
                return
            if op_id in self._terminated:
                run = self._running.get(name)
                if run is not None and run.op.id == op_id and not run.task.done():
                    run.task.cancel()
                continue
            with contextlib.suppress(Exception):
                by = await self.store.terminate_requested(name, op_id)
                if by:
                    self._stop(name, op_id, by)

    async def _attempts(self, job: _Job) -> Operation:
        app, desired, op, only = job.app, job.desired, job.op, job.only
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
                if op.id in self._terminated:
                    return  # TERMINATING stays what a reader sees
                await self.store.set_operation(
                    name, replace(op, message="running", results=tuple(results)), job.lease.fence
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
            await self.store.set_operation(name, op, job.lease.fence)
            await self._sleep(delay)
        # Ending on its own: a terminate arriving now no longer cancels it.
        self._ending.add(op.id)
        return await self._finish(job, op, result)

    async def _finish(self, job: _Job, op: Operation, result: SyncResult) -> Operation:
        """Record how an operation ended: history, operation, events, audit."""
        app, desired, principal = job.app, job.desired, job.principal
        rollback, previous_revision, name = job.rollback, job.previous_revision, job.app.name
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
                job.lease.fence,
            )
            history_id = entry.id
        await self.store.set_operation(name, op, job.lease.fence)
        if not op.dry_run:
            await self.store.set_auto(
                name,
                {
                    "revision": op.revision,
                    "phase": op.phase.value,
                    "end_time": op.end_time,
                    "automated": op.initiated_by == AUTOMATED,
                },
                job.lease.fence,
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
        """Cancel running operations; their leases are released, so the next reconcile (of
        any replica) marks them interrupted."""
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


#: Seconds a new operation waits for the lease of one whose end is already stored.
ENDING_GRACE = 2.0


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


def tool_error(err: ToolMissing) -> FailedPrecondition:
    """FAILED_PRECONDITION naming the rendering tool this server lacks."""
    return FailedPrecondition(
        str(err),
        reason="TOOL_NOT_FOUND",
        metadata={"tool": err.tool, "setting": err.setting, "source_kind": err.kind.value},
    )


def manifest_error(err: ManifestError, error: type[AutoEcoOpsError]) -> AutoEcoOpsError:
    """The status for manifests that do not parse: one violation per file and document."""
    return error(
        str(err),
        reason="INVALID_MANIFESTS",
        metadata={"count": str(len(err.violations))},
        field_violations=err.violations,
    )
