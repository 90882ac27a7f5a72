"""infra-manager's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import field_mask_pb2

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.infra.v1 import infra_pb2_grpc
from autoecoops.kernel.infra_manager import convert
from autoecoops.kernel.infra_manager.app import InfraApp, build
from autoecoops.kernel.mesh import paging
from autoecoops.kernel.mesh.auth import Principal, current_principal
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument, Unauthenticated
from autoecoops.kernel.mesh.fieldmask import merge_masked
from autoecoops.kernel.mesh.server import Runtime

DEFAULT_PAGE = 50
MAX_PAGE = 500
#: Fields of Application an update mask may name (the rest are the name or output-only).
WRITABLE = (
    "project",
    "source",
    "destination",
    "sync_policy",
    "ignore_differences",
    "revision_history_limit",
)


def _caller() -> Principal:
    principal = current_principal.get()
    if principal is None:
        raise Unauthenticated(
            "this call needs an authenticated caller", reason="CREDENTIALS_MISSING"
        )
    return principal


def merge_update(
    current: pb.Application, patch: pb.Application, mask: field_mask_pb2.FieldMask
) -> pb.Application:
    """``current`` with the fields ``mask`` names taken from ``patch`` (all writable ones if empty)."""
    paths = list(mask.paths) or list(WRITABLE)
    bad = [p for p in paths if p.split(".")[0] not in WRITABLE]
    if bad:
        raise InvalidArgument(
            f"update_mask names fields that cannot be changed: {', '.join(bad)}",
            reason="INVALID_UPDATE_MASK",
            field_violations=[FieldViolation("update_mask", f"{p} is not writable") for p in bad],
        )
    effective = field_mask_pb2.FieldMask(paths=paths)
    if not effective.IsValidForDescriptor(pb.Application.DESCRIPTOR):
        raise InvalidArgument(
            "update_mask names a field Application does not have",
            reason="INVALID_UPDATE_MASK",
            field_violations=[FieldViolation("update_mask", "unknown field path")],
        )
    return merge_masked(current, patch, paths)


class InfraServicer(infra_pb2_grpc.InfraServiceServicer):
    """Serves autoecoops.infra.v1.InfraService."""

    def __init__(self, app: InfraApp) -> None:
        self.app = app

    async def _view(self, name: str) -> pb.Application:
        m = self.app.manager
        application = await m.store.get(name)
        # The stored operation is the one that progresses (results, messages,
        # retries); the in-memory copy is only its start, kept for the moment
        # before the first write lands.
        op = await m.store.operation(name) or m.running(name)
        return convert.application_pb(application, await m.store.status(name), op)

    async def CreateApplication(
        self, request: pb.CreateApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateApplicationResponse:
        """Validate the spec and its source, then store it."""
        created = await self.app.manager.create(
            convert.application_of(request.application), _caller()
        )
        return pb.CreateApplicationResponse(application=convert.application_pb(created))

    async def GetApplication(
        self, request: pb.GetApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetApplicationResponse:
        """The application with its last status and operation."""
        return pb.GetApplicationResponse(application=await self._view(request.name))

    async def ListApplications(
        self, request: pb.ListApplicationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApplicationsResponse:
        """A page of applications in name order, optionally of one project."""
        size = paging.page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
        after = paging.decode_cursor(request.page_token) if request.page_token else ""
        store = self.app.manager.store
        out: list[pb.Application] = []
        last = ""
        more = False
        while len(out) < size:
            names = await store.names(after, size)
            if not names:
                break
            for name in names:
                after = name
                try:
                    view = await self._view(name)
                except Exception:
                    continue  # deleted between the listing and the read
                if request.project and view.project != request.project:
                    continue
                out.append(view)
                last = name
                if len(out) == size:
                    more = bool(await store.names(name, 1))
                    break
            if len(names) < size:
                break
        return pb.ListApplicationsResponse(
            applications=out, next_page_token=paging.encode_cursor(last) if more else ""
        )

    async def UpdateApplication(
        self, request: pb.UpdateApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateApplicationResponse:
        """Change the fields the mask names; validated as a create is."""
        name = request.application.name
        if not name:
            raise InvalidArgument(
                "application.name is required",
                field_violations=[FieldViolation("application.name", "required field is missing")],
            )
        current = convert.application_pb(await self.app.manager.store.get(name))
        merged = merge_update(current, request.application, request.update_mask)
        await self.app.manager.update(convert.application_of(merged), _caller())
        # As stored: the new spec with the status and operation it already had.
        return pb.UpdateApplicationResponse(application=await self._view(name))

    async def DeleteApplication(
        self, request: pb.DeleteApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteApplicationResponse:
        """Delete it (with cascade, its live resources first)."""
        await self.app.manager.delete(request.name, request.cascade, _caller())
        return pb.DeleteApplicationResponse()

    async def GetApplicationDiff(
        self, request: pb.GetApplicationDiffRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetApplicationDiffResponse:
        """A unified diff per resource against Git at the revision."""
        cmp = await self.app.manager.diff(request.name, request.revision)
        return pb.GetApplicationDiffResponse(
            revision=cmp.desired.revision,
            sync_status=convert.SYNC_CODES[cmp.sync],
            resource_diffs=[convert.diff_pb(d) for d in cmp.diffs],
        )

    async def GetManifests(
        self, request: pb.GetManifestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetManifestsResponse:
        """The manifests rendered at the revision, one entry per object."""
        revision, rendered = await self.app.manager.manifests(request.name, request.revision)
        return pb.GetManifestsResponse(
            revision=revision,
            manifests=[
                pb.RenderedManifest(
                    resource=convert.ref_pb(r.ref),
                    source_path=r.source_path,
                    document_index=r.document_index,
                    line=r.line,
                    yaml=r.yaml,
                )
                for r in rendered
            ],
        )

    async def SyncApplication(
        self, request: pb.SyncApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.SyncApplicationResponse:
        """Start a sync and return the RUNNING operation."""
        op = await self.app.manager.sync(
            request.name,
            _caller(),
            revision=request.revision,
            prune=request.prune,
            dry_run=request.dry_run,
            only=[convert.ref_of(r) for r in request.resources],
        )
        return pb.SyncApplicationResponse(operation=convert.operation_pb(op))

    async def RollbackApplication(
        self, request: pb.RollbackApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackApplicationResponse:
        """Start a rollback to a history entry and return the RUNNING operation."""
        op = await self.app.manager.rollback(
            request.name,
            request.history_id,
            _caller(),
            prune=request.prune,
            dry_run=request.dry_run,
            disable_auto_sync=request.disable_auto_sync,
        )
        return pb.RollbackApplicationResponse(operation=convert.operation_pb(op))

    async def TerminateOperation(
        self, request: pb.TerminateOperationRequest, context: grpc.aio.ServicerContext
    ) -> pb.TerminateOperationResponse:
        """Stop the running operation; it ends FAILED, "terminated by <caller>"."""
        op = await self.app.manager.terminate(request.name, _caller())
        return pb.TerminateOperationResponse(operation=convert.operation_pb(op))

    async def ListApplicationHistory(
        self, request: pb.ListApplicationHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListApplicationHistoryResponse:
        """A page of history, newest first."""
        size = paging.page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
        entries = await self.app.manager.history(request.name)
        start = 0
        if request.page_token:
            text = paging.decode_cursor(request.page_token)
            if not text.isdigit():
                raise InvalidArgument(
                    "page_token is not one this service issued",
                    reason="INVALID_PAGE_TOKEN",
                    field_violations=[FieldViolation("page_token", "malformed")],
                )
            start = int(text)
        page = entries[start : start + size]
        more = start + size < len(entries)
        return pb.ListApplicationHistoryResponse(
            entries=[convert.history_pb(e) for e in page],
            next_page_token=paging.encode_cursor(str(start + size)) if more else "",
        )

    async def RefreshApplication(
        self, request: pb.RefreshApplicationRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshApplicationResponse:
        """Reconcile now (re-reading Git) and return the fresh status."""
        await self.app.manager.store.get(request.name)
        if request.hard:
            self.app.manager.forget_rendered()
        settings = self.app.reconciler.settings
        await self.app.reconciler.reconcile(request.name, refresh=True, wait=2 * settings.lease.ttl)
        return pb.RefreshApplicationResponse(application=await self._view(request.name))


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add infra-manager's servicer to ``server`` and start its reconcile loop."""
    app = build(runtime)
    runtime.starters.append(app.start)
    runtime.closers.append(app.close)
    infra_pb2_grpc.add_InfraServiceServicer_to_server(InfraServicer(app), server)  # type: ignore[abstract]  # GetManifests: contract first, served next
    return [pb.DESCRIPTOR.services_by_name["InfraService"].full_name]
