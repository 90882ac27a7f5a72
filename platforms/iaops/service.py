"""Platform-02 IAOps's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.iaops.v1 import iaops_pb2_grpc
from autoecoops.kernel.mesh import paging
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.platforms.iaops import convert, report
from autoecoops.platforms.iaops.app import IaOpsApp

DEFAULT_PAGE = 50
MAX_PAGE = 500
UPDATABLE = ("description", "labels")
RENDERERS = {
    pb.REPORT_FORMAT_JSON: report.to_json,
    pb.REPORT_FORMAT_SARIF: report.to_sarif,
    pb.REPORT_FORMAT_JUNIT: report.to_junit,
}


def _name(name: str, field: str = "name") -> str:
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "deployments" or not parts[1]:
        raise InvalidArgument(
            f"{field} must be deployments/{{deployment}}",
            reason="INVALID_NAME",
            field_violations=[FieldViolation(field, "deployments/{deployment}")],
        )
    return name


class IaOpsServicer(iaops_pb2_grpc.IaOpsServiceServicer):
    """Serves autoecoops.iaops.v1.IaOpsService."""

    def __init__(self, app: IaOpsApp) -> None:
        self.app = app

    async def ValidateManifests(
        self, request: pb.ValidateManifestsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateManifestsResponse:
        """Validate files or an application's rendered manifests."""
        if bool(request.files) == bool(request.application):
            raise InvalidArgument(
                "set exactly one of files and application",
                reason="ONE_INPUT_REQUIRED",
                field_violations=[
                    FieldViolation("files", "set this or application"),
                    FieldViolation("application", "set this or files"),
                ],
            )
        bad = [
            FieldViolation(f"files[{i}].path", "required")
            for i, f in enumerate(request.files)
            if not f.path
        ]
        if request.revision and not request.application:
            bad.append(FieldViolation("revision", "only with application"))
        if bad:
            raise InvalidArgument("invalid files", reason="INVALID_FILES", field_violations=bad)
        if request.application or request.policy_bundle:
            await self.app.act_for(current_principal.get())
        options = {
            "bundle": request.policy_bundle,
            "packages": list(request.policy_packages),
            "skip": list(request.skip_rules),
        }
        if request.application:
            result = await self.app.validate_application(
                request.application,
                request.revision,
                **options,  # type: ignore[arg-type]
            )
        else:
            result = await self.app.validate_files(
                [(f.path, f.content) for f in request.files],
                **options,  # type: ignore[arg-type]
            )
        render = RENDERERS.get(request.report_format)
        return pb.ValidateManifestsResponse(
            report=convert.report_pb(result), rendered_report=render(result) if render else ""
        )

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDeploymentResponse:
        """Run the deployment flow to its end."""
        caller = current_principal.get()
        await self.app.act_for(caller)
        deployment = await self.app.flow.create(request, caller)
        return pb.CreateDeploymentResponse(deployment=deployment)

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        """A deployment's record."""
        return pb.GetDeploymentResponse(deployment=await self.app.store.get(_name(request.name)))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        """A page of deployments, newest first, optionally filtered."""
        size = paging.page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
        cursor = paging.decode_cursor(request.page_token)
        after: float | None = None
        if cursor:
            try:
                after = float(cursor)
            except ValueError:
                raise InvalidArgument(
                    "page_token is not one this service issued",
                    reason="INVALID_PAGE_TOKEN",
                    field_violations=[FieldViolation("page_token", "malformed")],
                ) from None
        store = self.app.store
        out: list[pb.Deployment] = []
        last: float | None = None
        more = False
        while len(out) < size:
            rows = await store.page(after, size)
            if not rows:
                break
            scores = dict(rows)
            for d in await store.many([n for n, _ in rows]):
                after = scores[d.name]
                if request.application and d.application != request.application:
                    continue
                if request.state and d.state != request.state:
                    continue
                out.append(d)
                last = after
                if len(out) == size:
                    more = bool(await store.page(after, 1))
                    break
            if len(rows) < size:
                break
        token = paging.encode_cursor(repr(last)) if more and last is not None else ""
        return pb.ListDeploymentsResponse(deployments=out, next_page_token=token)

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeploymentResponse:
        """Change a record's description or labels, compare-and-set on the etag."""
        name = _name(request.deployment.name, "deployment.name")
        paths = list(request.update_mask.paths) or list(UPDATABLE)
        bad = [p for p in paths if p not in UPDATABLE]
        if bad or not request.deployment.etag:
            violations = [FieldViolation("update_mask", f"{p} cannot be changed") for p in bad]
            if not request.deployment.etag:
                violations.append(FieldViolation("deployment.etag", "required: the etag you read"))
            raise InvalidArgument(
                "invalid update", reason="INVALID_UPDATE", field_violations=violations
            )
        current = await self.app.store.get(name)
        change = pb.Deployment(
            description=request.deployment.description
            if "description" in paths
            else current.description,
        )
        change.labels.update(request.deployment.labels if "labels" in paths else current.labels)
        updated = await self.app.store.update(name, request.deployment.etag, change)
        return pb.UpdateDeploymentResponse(deployment=updated)

    async def VerifyArtifact(
        self, request: pb.VerifyArtifactRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyArtifactResponse:
        """Verify, scan and gate an artifact."""
        caller = current_principal.get()
        await self.app.act_for(caller)
        return await self.app.verify(request, caller)

    async def ScanSbom(
        self, request: pb.ScanSbomRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScanSbomResponse:
        """Match an SBOM against the offline OSV database."""
        return await self.app.scan(request.document, request.format)


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add Platform-02 IAOps's servicer to ``server``."""
    iaops_pb2_grpc.add_IaOpsServiceServicer_to_server(IaOpsServicer(IaOpsApp(runtime)), server)
    return [pb.DESCRIPTOR.services_by_name["IaOpsService"].full_name]
