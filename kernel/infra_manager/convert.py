"""Translation between ``autoecoops.infra.v1`` messages and the domain objects."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.kernel.infra_manager.diff import ResourceDiff
from autoecoops.kernel.infra_manager.model import (
    Application,
    AppStatus,
    Automated,
    Backoff,
    Destination,
    Health,
    HelmParameter,
    HelmSource,
    HistoryEntry,
    IgnoreRule,
    KustomizeSource,
    Operation,
    Phase,
    Ref,
    ResourceResult,
    ResourceSync,
    ResultCode,
    Retry,
    Source,
    SyncCode,
    SyncPolicy,
)

SYNC_CODES = {
    SyncCode.SYNCED: pb.SYNC_STATUS_CODE_SYNCED,
    SyncCode.OUT_OF_SYNC: pb.SYNC_STATUS_CODE_OUT_OF_SYNC,
    SyncCode.UNKNOWN: pb.SYNC_STATUS_CODE_UNKNOWN,
}
HEALTH = {
    Health.HEALTHY: pb.HEALTH_STATUS_CODE_HEALTHY,
    Health.PROGRESSING: pb.HEALTH_STATUS_CODE_PROGRESSING,
    Health.DEGRADED: pb.HEALTH_STATUS_CODE_DEGRADED,
    Health.SUSPENDED: pb.HEALTH_STATUS_CODE_SUSPENDED,
    Health.MISSING: pb.HEALTH_STATUS_CODE_MISSING,
    Health.UNKNOWN: pb.HEALTH_STATUS_CODE_UNKNOWN,
}
RESOURCE_SYNC = {
    ResourceSync.SYNCED: pb.RESOURCE_SYNC_STATUS_SYNCED,
    ResourceSync.OUT_OF_SYNC: pb.RESOURCE_SYNC_STATUS_OUT_OF_SYNC,
    ResourceSync.MISSING: pb.RESOURCE_SYNC_STATUS_MISSING,
    ResourceSync.EXTRANEOUS: pb.RESOURCE_SYNC_STATUS_EXTRANEOUS,
}
PHASES = {
    Phase.RUNNING: pb.OPERATION_PHASE_RUNNING,
    Phase.SUCCEEDED: pb.OPERATION_PHASE_SUCCEEDED,
    Phase.FAILED: pb.OPERATION_PHASE_FAILED,
    Phase.ERROR: pb.OPERATION_PHASE_ERROR,
    Phase.TERMINATING: pb.OPERATION_PHASE_TERMINATING,
}
RESULT_CODES = {
    ResultCode.SYNCED: pb.RESOURCE_RESULT_CODE_SYNCED,
    ResultCode.SYNC_FAILED: pb.RESOURCE_RESULT_CODE_SYNC_FAILED,
    ResultCode.PRUNED: pb.RESOURCE_RESULT_CODE_PRUNED,
    ResultCode.PRUNE_SKIPPED: pb.RESOURCE_RESULT_CODE_PRUNE_SKIPPED,
}


def timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    """A Timestamp of seconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(epoch * 1e9))
    return ts


def _seconds(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e9


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def ref_pb(ref: Ref) -> pb.ResourceRef:
    """A ResourceRef."""
    return pb.ResourceRef(
        group=ref.group, version=ref.version, kind=ref.kind, namespace=ref.namespace, name=ref.name
    )


def ref_of(msg: pb.ResourceRef) -> Ref:
    """A Ref from a ResourceRef."""
    return Ref(msg.group, msg.version, msg.kind, msg.namespace, msg.name)


def result_pb(r: ResourceResult) -> pb.ResourceResult:
    """A ResourceResult message."""
    return pb.ResourceResult(resource=ref_pb(r.ref), code=RESULT_CODES[r.code], message=r.message)


def source_pb(s: Source) -> pb.ApplicationSource:
    """An ApplicationSource."""
    out = pb.ApplicationSource(repo_url=s.repo_url, target_revision=s.target_revision, path=s.path)
    if s.helm is not None:
        h = s.helm
        out.helm.CopyFrom(
            pb.ApplicationSourceHelm(
                value_files=h.value_files,
                values=h.values,
                parameters=[
                    pb.HelmParameter(name=p.name, value=p.value, force_string=p.force_string)
                    for p in h.parameters
                ],
                release_name=h.release_name,
                namespace=h.namespace,
                kube_version=h.kube_version,
                api_versions=h.api_versions,
                skip_crds=h.skip_crds,
                ignore_missing_value_files=h.ignore_missing_value_files,
            )
        )
    if s.kustomize is not None:
        k = s.kustomize
        out.kustomize.CopyFrom(
            pb.ApplicationSourceKustomize(
                name_prefix=k.name_prefix,
                name_suffix=k.name_suffix,
                images=k.images,
                common_labels=dict(k.common_labels),
                common_annotations=dict(k.common_annotations),
                namespace=k.namespace,
            )
        )
    return out


def source_of(msg: pb.ApplicationSource) -> Source:
    """The domain source of an ApplicationSource."""
    helm = kustomize = None
    if msg.HasField("helm"):
        h = msg.helm
        helm = HelmSource(
            value_files=tuple(h.value_files),
            values=h.values,
            parameters=tuple(HelmParameter(p.name, p.value, p.force_string) for p in h.parameters),
            release_name=h.release_name,
            namespace=h.namespace,
            kube_version=h.kube_version,
            api_versions=tuple(h.api_versions),
            skip_crds=h.skip_crds,
            ignore_missing_value_files=h.ignore_missing_value_files,
        )
    if msg.HasField("kustomize"):
        k = msg.kustomize
        kustomize = KustomizeSource(
            name_prefix=k.name_prefix,
            name_suffix=k.name_suffix,
            images=tuple(k.images),
            common_labels=tuple(sorted(k.common_labels.items())),
            common_annotations=tuple(sorted(k.common_annotations.items())),
            namespace=k.namespace,
        )
    return Source(msg.repo_url, msg.target_revision, msg.path, helm, kustomize)


def application_of(msg: pb.Application) -> Application:
    """The domain application of a request's Application (output-only fields ignored)."""
    sp = msg.sync_policy
    automated = None
    if sp.HasField("automated"):
        a = sp.automated
        automated = Automated(prune=a.prune, self_heal=a.self_heal, allow_empty=a.allow_empty)
    retry = None
    if sp.HasField("retry"):
        b = sp.retry.backoff
        default = Backoff()
        retry = Retry(
            limit=sp.retry.limit,
            backoff=Backoff(
                duration=_seconds(b.duration) if b.HasField("duration") else default.duration,
                factor=float(b.factor) if b.factor else default.factor,
                max_duration=_seconds(b.max_duration)
                if b.HasField("max_duration")
                else default.max_duration,
            ),
        )
    return Application(
        name=msg.name,
        project=msg.project or "default",
        source=source_of(msg.source),
        destination=Destination(msg.destination.namespace, msg.destination.cluster),
        sync_policy=SyncPolicy(automated, retry, sp.detect_only),
        ignore_differences=tuple(
            IgnoreRule(r.kind, r.group, r.name, r.namespace, tuple(r.json_pointers))
            for r in msg.ignore_differences
        ),
        revision_history_limit=msg.revision_history_limit,
    )


def operation_pb(op: Operation) -> pb.OperationState:
    """An OperationState."""
    out = pb.OperationState(
        id=op.id,
        phase=PHASES[op.phase],
        message=op.message,
        revision=op.revision,
        dry_run=op.dry_run,
        prune=op.prune,
        rollback_history_id=op.rollback_history_id,
        resource_results=[result_pb(r) for r in op.results],
        initiated_by=op.initiated_by,
        start_time=timestamp(op.start_time),
        retry_count=op.retry_count,
    )
    if op.end_time:
        out.end_time.CopyFrom(timestamp(op.end_time))
    return out


def status_pb(status: AppStatus | None, op: Operation | None) -> pb.ApplicationStatus:
    """An ApplicationStatus (Unknown before the first reconcile)."""
    out = pb.ApplicationStatus()
    if status is None:
        out.sync.status = pb.SYNC_STATUS_CODE_UNKNOWN
        out.health.status = pb.HEALTH_STATUS_CODE_UNKNOWN
    else:
        out.sync.status = SYNC_CODES[status.sync]
        out.sync.revision = status.revision
        out.health.status = HEALTH[status.health]
        out.health.message = status.health_message
        for r in status.resources:
            out.resources.append(
                pb.ResourceStatus(
                    resource=ref_pb(r.ref),
                    status=RESOURCE_SYNC[r.status],
                    health=pb.HealthStatus(status=HEALTH[r.health], message=r.health_message),
                    hook=r.hook,
                    sync_wave=r.wave,
                )
            )
        if status.reconcile_time:
            out.reconcile_time.CopyFrom(timestamp(status.reconcile_time))
        for c in status.conditions:
            out.conditions.append(
                pb.ApplicationCondition(
                    type=c.type, message=c.message, observe_time=timestamp(c.time)
                )
            )
    if op is not None:
        out.operation_state.CopyFrom(operation_pb(op))
    return out


def application_pb(
    app: Application, status: AppStatus | None = None, op: Operation | None = None
) -> pb.Application:
    """An Application with its status."""
    sp = app.sync_policy
    policy = pb.SyncPolicy(detect_only=sp.detect_only)
    if sp.automated is not None:
        policy.automated.CopyFrom(
            pb.SyncPolicyAutomated(
                prune=sp.automated.prune,
                self_heal=sp.automated.self_heal,
                allow_empty=sp.automated.allow_empty,
            )
        )
    if sp.retry is not None:
        b = sp.retry.backoff
        policy.retry.CopyFrom(
            pb.RetryStrategy(
                limit=sp.retry.limit,
                backoff=pb.Backoff(
                    duration=_duration(b.duration),
                    factor=int(b.factor),
                    max_duration=_duration(b.max_duration),
                ),
            )
        )
    return pb.Application(
        name=app.name,
        project=app.project,
        source=source_pb(app.source),
        destination=pb.ApplicationDestination(
            cluster=app.destination.cluster, namespace=app.destination.namespace
        ),
        sync_policy=policy,
        ignore_differences=[
            pb.ResourceIgnoreDifferences(
                group=r.group,
                kind=r.kind,
                name=r.name,
                namespace=r.namespace,
                json_pointers=list(r.json_pointers),
            )
            for r in app.ignore_differences
        ],
        revision_history_limit=app.revision_history_limit,
        status=status_pb(status, op),
        create_time=timestamp(app.create_time),
        update_time=timestamp(app.update_time),
    )


def history_pb(e: HistoryEntry) -> pb.HistoryEntry:
    """A HistoryEntry."""
    return pb.HistoryEntry(
        id=e.id,
        revision=e.revision,
        manifest_digest=e.manifest_digest,
        deploy_time=timestamp(e.deploy_time),
        initiated_by=e.initiated_by,
        source=source_pb(e.source),
    )


def diff_pb(d: ResourceDiff) -> pb.ResourceDiff:
    """A ResourceDiff with its unified diff."""
    return pb.ResourceDiff(resource=ref_pb(d.ref), status=RESOURCE_SYNC[d.status], diff=d.text())
