"""policy-audit's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import json_format, timestamp

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.auth import current_principal
from autoecoops.kernel.mesh.errors import FailedPrecondition
from autoecoops.kernel.mesh.interceptors import current_trace_id
from autoecoops.kernel.mesh.paging import page_by_key
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.kernel.policy_audit import compliance
from autoecoops.kernel.policy_audit.app import PolicyAudit, build
from autoecoops.kernel.policy_audit.bundles import BundleSpec
from autoecoops.kernel.policy_audit.decisions import value_to_input
from autoecoops.kernel.policy_audit.trail import EntryFilter, SignedCheckpoint
from autoecoops.policy.v1 import policy_pb2, policy_pb2_grpc

_RESULTS = {
    "pass": audit_pb2.RESULT_PASS,
    "fail": audit_pb2.RESULT_FAIL,
    "warn": audit_pb2.RESULT_WARN,
    "error": audit_pb2.RESULT_ERROR,
    "skip": audit_pb2.RESULT_SKIP,
}


def bundle_to_proto(spec: BundleSpec) -> policy_pb2.Bundle:
    """A stored bundle as its proto."""
    msg = policy_pb2.Bundle(
        name=spec.name,
        description=spec.description,
        roots=list(spec.roots),
        modules=[policy_pb2.PolicyModule(path=p, source=s) for p, s in spec.modules],
        masks=list(spec.masks),
        revision=spec.revision,
        create_time=timestamp.from_nanoseconds(spec.create_time_ns),
        update_time=timestamp.from_nanoseconds(spec.update_time_ns),
        activate_time=timestamp.from_nanoseconds(spec.activate_time_ns),
    )
    msg.data.update(dict(spec.data))
    return msg


def bundle_from_proto(msg: policy_pb2.Bundle) -> BundleSpec:
    """A requested bundle as a domain spec (output-only fields ignored)."""
    return BundleSpec(
        name=msg.name,
        description=msg.description,
        roots=tuple(r.strip("/") for r in msg.roots),
        modules=tuple(sorted((m.path, m.source) for m in msg.modules)),
        data=json_format.MessageToDict(msg.data),
        masks=tuple(msg.masks),
    )


def checkpoint_to_proto(cp: SignedCheckpoint) -> audit_pb2.Checkpoint:
    """A signed checkpoint as its proto."""
    return audit_pb2.Checkpoint(
        origin=cp.body.origin,
        tree_size=cp.body.size,
        root_hash=cp.body.root_hash,
        signed_note=cp.note,
        time=timestamp.from_nanoseconds(cp.time_ns),
    )


def _page(names: Sequence[str], page_size: int, token: str) -> tuple[list[str], str]:
    return page_by_key(names, page_size, token, str, default=50, maximum=500)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Serves autoecoops.policy.v1.PolicyService."""

    def __init__(self, app: PolicyAudit) -> None:
        self.app = app

    async def Evaluate(
        self, request: policy_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.EvaluateResponse:
        """Evaluate a data path for an input (OPA's Data API)."""
        doc = value_to_input(request.input, request.HasField("input"))
        got = await self.app.decider.evaluate(
            request.path, doc, current_principal.get(), current_trace_id()
        )
        reply = policy_pb2.EvaluateResponse(
            decision_id=got.decision_id,
            bundle_revision=got.bundle_revision,
            defined=got.decision.defined,
        )
        if got.decision.defined:
            json_format.ParseDict(got.decision.value, reply.result)
        return reply

    async def CreateBundle(
        self, request: policy_pb2.CreateBundleRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.CreateBundleResponse:
        """Compile, store and activate a bundle."""
        spec = await self.app.registry.create(bundle_from_proto(request.bundle))
        return policy_pb2.CreateBundleResponse(bundle=bundle_to_proto(spec))

    async def GetBundle(
        self, request: policy_pb2.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.GetBundleResponse:
        """One bundle."""
        return policy_pb2.GetBundleResponse(
            bundle=bundle_to_proto(await self.app.registry.get(request.name))
        )

    async def ListBundles(
        self, request: policy_pb2.ListBundlesRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ListBundlesResponse:
        """A page of bundles, by name."""
        stored = await self.app.registry.all()
        names, token = _page(list(stored), request.page_size, request.page_token)
        return policy_pb2.ListBundlesResponse(
            bundles=[bundle_to_proto(stored[n]) for n in names], next_page_token=token
        )

    async def UpdateBundle(
        self, request: policy_pb2.UpdateBundleRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.UpdateBundleResponse:
        """Change a bundle; the new revision is active only if it compiles."""
        spec = await self.app.registry.update(
            bundle_from_proto(request.bundle), list(request.update_mask.paths)
        )
        return policy_pb2.UpdateBundleResponse(bundle=bundle_to_proto(spec))

    async def DeleteBundle(
        self, request: policy_pb2.DeleteBundleRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.DeleteBundleResponse:
        """Delete a bundle."""
        await self.app.registry.delete(request.name)
        return policy_pb2.DeleteBundleResponse()


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Serves autoecoops.audit.v1.AuditService."""

    def __init__(self, app: PolicyAudit) -> None:
        self.app = app

    async def AppendEntry(
        self, request: audit_pb2.AppendEntryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.AppendEntryResponse:
        """Append an entry (once per request id) and return where it landed."""
        try:
            got = await self.app.audit.append(request.entry, request.request_id)
        except FailedPrecondition as err:
            await self.app.key_mismatch(err)
            raise
        return audit_pb2.AppendEntryResponse(
            index=got.index, leaf_hash=got.leaf_hash, checkpoint=checkpoint_to_proto(got.checkpoint)
        )

    async def BatchAppendEntries(
        self, request: audit_pb2.BatchAppendEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.BatchAppendEntriesResponse:
        """Append many entries in order (each once per request id) in as few commits as fit."""
        got = await self.app.audit.append_many([(r.entry, r.request_id) for r in request.requests])
        reply = audit_pb2.BatchAppendEntriesResponse(
            entries=[
                audit_pb2.AppendedEntry(index=a.index, leaf_hash=a.leaf_hash, replayed=a.replayed)
                for a in got
            ]
        )
        latest = (
            max((a.checkpoint for a in got), key=lambda c: c.body.size)
            if got
            else await self.app.audit.checkpoint()
        )
        reply.checkpoint.CopyFrom(checkpoint_to_proto(latest))
        return reply

    async def GetEntry(
        self, request: audit_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetEntryResponse:
        """An entry with its exact bytes."""
        stored = await self.app.audit.entry(request.index)
        return audit_pb2.GetEntryResponse(
            entry=stored.entry, entry_bytes=stored.data, leaf_hash=stored.leaf_hash
        )

    async def ListEntries(
        self, request: audit_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListEntriesResponse:
        """A filtered page of entries in index order."""
        flt = EntryFilter(
            start_us=request.start_time.ToMicroseconds()
            if request.HasField("start_time")
            else None,
            end_us=request.end_time.ToMicroseconds() if request.HasField("end_time") else None,
            type=request.type,
            actor=request.actor,
            resource=request.resource,
            trace_id=request.trace_id,
        )
        entries, token = await self.app.audit.list_entries(
            flt, request.page_size, request.page_token
        )
        return audit_pb2.ListEntriesResponse(entries=entries, next_page_token=token)

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetCheckpointResponse:
        """The latest checkpoint and the key that verifies it."""
        try:
            cp = await self.app.audit.checkpoint()
        except FailedPrecondition as err:
            await self.app.key_mismatch(err)
            raise
        verifier = self.app.signer.verifier
        return audit_pb2.GetCheckpointResponse(
            checkpoint=checkpoint_to_proto(cp), verifier_key=verifier.vkey(), key_id=verifier.key_id
        )

    async def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        """An RFC 6962 audit path."""
        size, hashes = await self.app.audit.inclusion_proof(request.index, request.tree_size)
        return audit_pb2.GetInclusionProofResponse(
            leaf_index=request.index, tree_size=size, hashes=hashes
        )

    async def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetConsistencyProofResponse:
        """An RFC 6962 consistency proof."""
        size, hashes = await self.app.audit.consistency_proof(request.old_size, request.new_size)
        return audit_pb2.GetConsistencyProofResponse(
            old_size=request.old_size, new_size=size, hashes=hashes
        )

    async def GenerateComplianceReport(
        self,
        request: audit_pb2.GenerateComplianceReportRequest,
        context: grpc.aio.ServicerContext,
    ) -> audit_pb2.GenerateComplianceReportResponse:
        """Evaluate controls over a time range, with evidence provable against one checkpoint."""
        controls = compliance.select(
            self.app.controls, list(request.frameworks), list(request.control_ids)
        )
        end = request.end_time if request.HasField("end_time") else None
        start_us = request.start_time.ToMicroseconds()
        end_us = end.ToMicroseconds() if end is not None else _now_us()
        report = await compliance.generate(
            self.app.audit, controls, start_us, end_us, list(request.frameworks)
        )
        return audit_pb2.GenerateComplianceReportResponse(
            report=report_to_proto(report, request.format)
        )


def _now_us() -> int:
    return timestamp.to_microseconds(timestamp.from_current_time())


def report_to_proto(
    report: compliance.ComplianceReport, fmt: int = audit_pb2.REPORT_FORMAT_JSON
) -> audit_pb2.Report:
    """A domain report as its proto (with HTML when asked for)."""
    summary = report.summary()
    msg = audit_pb2.Report(
        start_time=timestamp.from_nanoseconds(report.start_us * 1000),
        end_time=timestamp.from_nanoseconds(report.end_us * 1000),
        generate_time=timestamp.from_nanoseconds(report.generate_ns),
        frameworks=list(report.frameworks),
        summary=audit_pb2.ReportSummary(
            pass_count=summary["pass"],
            fail_count=summary["fail"],
            warn_count=summary["warn"],
            error_count=summary["error"],
            skip_count=summary["skip"],
        ),
        checkpoint=checkpoint_to_proto(report.checkpoint),
    )
    for r in report.results:
        msg.controls.append(
            audit_pb2.ControlResult(
                control_id=r.control.id,
                title=r.control.title,
                mappings=[
                    audit_pb2.ControlMapping(framework=fw, control_id=cid)
                    for fw, ids in r.control.mappings.items()
                    for cid in ids
                ],
                result=_RESULTS[r.result],
                message=r.message,
                evidence=[
                    audit_pb2.Evidence(
                        entry=ev.stored.entry,
                        entry_bytes=ev.stored.data,
                        leaf_hash=ev.stored.leaf_hash,
                        inclusion_proof=ev.proof,
                    )
                    for ev in r.evidence
                ],
            )
        )
    if fmt == audit_pb2.REPORT_FORMAT_HTML:
        msg.html = compliance.render_html(report)
    return msg


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add policy-audit's servicers to ``server``."""
    app = build(runtime)
    if isinstance(runtime.auditor, AuditTrail) and runtime.config.redis_url:
        # This process holds the log: its relay appends in-process, no RPC.
        runtime.auditor.use_local(app.audit.append_many)
    app.start()
    runtime.starters.append(app.check_signing_key)
    runtime.closers.append(app.close)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(app), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(app), server)
    return [
        policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    ]
