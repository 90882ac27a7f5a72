"""The domain objects of infra-manager, modelled on Argo CD's Application.

Plain dataclasses with ``to_dict``/``from_dict`` for the store; the gRPC edge
translates them to and from ``autoecoops.infra.v1`` messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from autoecoops.kernel.mesh.backoff import exponential_delay
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

#: Application names: DNS-label-like, so they are safe in keys, labels and URLs.
_APP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Kubernetes namespace names (RFC 1123 labels).
_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Helm release names (helm's own limit is 53 characters).
_RELEASE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,51}[a-z0-9])?$")
_KUBE_VERSION = re.compile(r"^v?\d+\.\d+(\.\d+)?([-+][0-9A-Za-z.-]+)?$")
#: ``kustomize edit set image`` arguments.
_IMAGE = re.compile(r"^[^\s=]+(=[^\s=]+)?$")
#: What the reconciler calls itself in ``initiated_by``.
AUTOMATED = "automated"


class SyncCode(StrEnum):
    """Whether an application's live state matches Git."""

    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"
    UNKNOWN = "Unknown"


class Health(StrEnum):
    """The health of a resource or application, worst last (Argo CD's order)."""

    HEALTHY = "Healthy"
    SUSPENDED = "Suspended"
    PROGRESSING = "Progressing"
    MISSING = "Missing"
    DEGRADED = "Degraded"
    UNKNOWN = "Unknown"

    @property
    def rank(self) -> int:
        """Position in the worst-of order."""
        return list(Health).index(self)


class ResourceSync(StrEnum):
    """Whether one resource matches Git."""

    SYNCED = "Synced"
    OUT_OF_SYNC = "OutOfSync"
    MISSING = "Missing"
    EXTRANEOUS = "Extraneous"


class Phase(StrEnum):
    """The phase of a sync operation."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ERROR = "Error"
    TERMINATING = "Terminating"


class ResultCode(StrEnum):
    """What a sync did to one resource."""

    SYNCED = "Synced"
    SYNC_FAILED = "SyncFailed"
    PRUNED = "Pruned"
    PRUNE_SKIPPED = "PruneSkipped"


@dataclass(frozen=True, slots=True, order=True)
class Ref:
    """One Kubernetes object: group/version/kind/namespace/name."""

    group: str
    version: str
    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        """``group/version/kind/namespace/name``: the object's key in the embedded store."""
        return f"{self.group}/{self.version}/{self.kind}/{self.namespace}/{self.name}"

    @property
    def api_version(self) -> str:
        """``apiVersion`` as written in a manifest."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.group + '/' if self.group else ''}{self.kind}/{where}{self.name}"

    @classmethod
    def from_key(cls, key: str) -> Ref:
        """Parse ``Ref.key``."""
        group, version, kind, namespace, name = key.split("/", 4)
        return cls(group, version, kind, namespace, name)

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Ref:
        """The ref of a manifest or live object."""
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        meta = obj.get("metadata") or {}
        return cls(
            group, version, str(obj.get("kind", "")), meta.get("namespace") or "", meta["name"]
        )


@dataclass(frozen=True, slots=True)
class HelmParameter:
    """One ``--set`` (or ``--set-string``) value of ``helm template``."""

    name: str
    value: str = ""
    force_string: bool = False


@dataclass(frozen=True, slots=True)
class HelmSource:
    """How a Helm chart is rendered (the options of ``helm template``)."""

    #: ``-f`` files in order, relative to the chart; a leading ``/`` means the repository root.
    value_files: tuple[str, ...] = ()
    #: Inline values (a YAML mapping), applied after the files.
    values: str = ""
    #: ``--set`` values, applied last.
    parameters: tuple[HelmParameter, ...] = ()
    #: ``.Release.Name``; '' means the application's name.
    release_name: str = ""
    #: ``.Release.Namespace``; '' means the destination namespace.
    namespace: str = ""
    #: ``--kube-version``; '' means helm's default.
    kube_version: str = ""
    #: ``--api-versions``.
    api_versions: tuple[str, ...] = ()
    skip_crds: bool = False
    ignore_missing_value_files: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            **_fields(self),
            "value_files": list(self.value_files),
            "parameters": [_fields(p) for p in self.parameters],
            "api_versions": list(self.api_versions),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HelmSource:
        """Inverse of ``to_dict``."""
        return cls(
            **{
                **d,
                "value_files": tuple(d.get("value_files", ())),
                "parameters": tuple(HelmParameter(**p) for p in d.get("parameters", ())),
                "api_versions": tuple(d.get("api_versions", ())),
            }
        )


@dataclass(frozen=True, slots=True)
class KustomizeSource:
    """What is added on top of a Kustomize overlay (as ``kustomize edit`` would)."""

    name_prefix: str = ""
    name_suffix: str = ""
    #: ``kustomize edit set image`` forms: ``name=new:tag``, ``name:tag``, ``name@digest``.
    images: tuple[str, ...] = ()
    #: Sorted (key, value) pairs, so the source stays hashable.
    common_labels: tuple[tuple[str, str], ...] = ()
    common_annotations: tuple[tuple[str, str], ...] = ()
    namespace: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            **_fields(self),
            "images": list(self.images),
            "common_labels": dict(self.common_labels),
            "common_annotations": dict(self.common_annotations),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KustomizeSource:
        """Inverse of ``to_dict``."""
        return cls(
            **{
                **d,
                "images": tuple(d.get("images", ())),
                "common_labels": tuple(sorted((d.get("common_labels") or {}).items())),
                "common_annotations": tuple(sorted((d.get("common_annotations") or {}).items())),
            }
        )


@dataclass(frozen=True, slots=True)
class Source:
    """Where the desired state lives in Git, and how it is rendered."""

    repo_url: str
    target_revision: str = ""
    path: str = ""
    #: Helm options; a Chart.yaml in ``path`` makes it a chart too.
    helm: HelmSource | None = None
    #: Kustomize options; a kustomization.yaml in ``path`` makes it an overlay too.
    kustomize: KustomizeSource | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "repo_url": self.repo_url,
            "target_revision": self.target_revision,
            "path": self.path,
            "helm": self.helm.to_dict() if self.helm else None,
            "kustomize": self.kustomize.to_dict() if self.kustomize else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        """Inverse of ``to_dict`` (older records have no helm or kustomize)."""
        helm, kustomize = d.get("helm"), d.get("kustomize")
        return cls(
            d["repo_url"],
            d.get("target_revision", ""),
            d.get("path", ""),
            HelmSource.from_dict(helm) if helm else None,
            KustomizeSource.from_dict(kustomize) if kustomize else None,
        )


@dataclass(frozen=True, slots=True)
class Destination:
    """The cluster and namespace an application deploys to."""

    namespace: str
    cluster: str = ""


@dataclass(frozen=True, slots=True)
class Automated:
    """Automated sync settings."""

    prune: bool = False
    self_heal: bool = False
    allow_empty: bool = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between retries, in seconds."""

    duration: float = 5.0
    factor: float = 2.0
    max_duration: float = 180.0

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1-based)."""
        return exponential_delay(retry, self.duration, self.factor, self.max_duration)


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failed sync is retried: ``limit`` < 0 means without end."""

    limit: int = 0
    backoff: Backoff = field(default_factory=Backoff)

    def allows(self, retries_done: int) -> bool:
        """Whether another retry may follow ``retries_done`` of them."""
        return self.limit < 0 or retries_done < self.limit


@dataclass(frozen=True, slots=True)
class SyncPolicy:
    """When and how an application is synced; no ``automated`` means manual."""

    automated: Automated | None = None
    retry: Retry | None = None
    detect_only: bool = False


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    """Fields (RFC 6901 pointers) of matching resources whose differences are ignored."""

    kind: str
    group: str = ""
    name: str = ""
    namespace: str = ""
    json_pointers: tuple[str, ...] = ()

    def matches(self, ref: Ref) -> bool:
        """Whether the rule applies to ``ref``."""
        return (
            self.kind == ref.kind
            and self.group == ref.group
            and (not self.name or self.name == ref.name)
            and (not self.namespace or self.namespace == ref.namespace)
        )


@dataclass(frozen=True, slots=True)
class Owner:
    """Who last set an application's spec; automated syncs act with their authority."""

    subject: str
    issuer: str = ""
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Application:
    """An application: manifests in Git, one destination, a sync policy."""

    name: str
    source: Source
    destination: Destination
    project: str = "default"
    sync_policy: SyncPolicy = field(default_factory=SyncPolicy)
    ignore_differences: tuple[IgnoreRule, ...] = ()
    revision_history_limit: int = 0
    create_time: float = 0.0
    update_time: float = 0.0
    owner: Owner = field(default_factory=lambda: Owner(""))

    @property
    def automated(self) -> Automated | None:
        """The automated policy, if sync is automated."""
        return self.sync_policy.automated

    def history_limit(self, default: int) -> int:
        """How many history entries to keep."""
        return self.revision_history_limit or default

    def without_auto_sync(self) -> Application:
        """The same application with automated sync off."""
        return replace(self, sync_policy=replace(self.sync_policy, automated=None))

    def validate(self) -> None:
        """Reject a malformed spec with every violation named."""
        bad: list[FieldViolation] = []
        if not _APP_NAME.match(self.name):
            bad.append(
                FieldViolation(
                    "application.name", "lowercase letters, digits and '-', at most 63 characters"
                )
            )
        if not self.source.repo_url:
            bad.append(FieldViolation("application.source.repo_url", "required field is missing"))
        if self.source.path.startswith("/") or ".." in self.source.path.split("/"):
            bad.append(
                FieldViolation(
                    "application.source.path", "must be relative and stay inside the repository"
                )
            )
        helm = self.source.helm
        if helm is not None and self.source.kustomize is not None:
            bad.append(FieldViolation("application.source", "set helm or kustomize, not both"))
        if helm is not None:
            for i, vf in enumerate(helm.value_files):
                if not vf or ".." in vf.split("/") or "://" in vf:
                    bad.append(
                        FieldViolation(
                            f"application.source.helm.value_files[{i}]",
                            "a file in the repository (no '..', no URL)",
                        )
                    )
            for i, p in enumerate(helm.parameters):
                if not p.name or "=" in p.name:
                    bad.append(
                        FieldViolation(
                            f"application.source.helm.parameters[{i}].name",
                            "a value path like image.tag",
                        )
                    )
            if helm.release_name and not _RELEASE.match(helm.release_name):
                bad.append(
                    FieldViolation(
                        "application.source.helm.release_name",
                        "lowercase letters, digits and '-', at most 53 characters",
                    )
                )
            if helm.namespace and not _NAMESPACE.match(helm.namespace):
                bad.append(
                    FieldViolation(
                        "application.source.helm.namespace", "not a valid Kubernetes namespace name"
                    )
                )
            if helm.kube_version and not _KUBE_VERSION.match(helm.kube_version):
                bad.append(
                    FieldViolation(
                        "application.source.helm.kube_version", "a version like 1.29 or v1.29.0"
                    )
                )
            if helm.values:
                bad.extend(_values_violations(helm.values))
        kz = self.source.kustomize
        if kz is not None:
            if kz.namespace and not _NAMESPACE.match(kz.namespace):
                bad.append(
                    FieldViolation(
                        "application.source.kustomize.namespace",
                        "not a valid Kubernetes namespace name",
                    )
                )
            for i, image in enumerate(kz.images):
                if not _IMAGE.match(image):
                    bad.append(
                        FieldViolation(
                            f"application.source.kustomize.images[{i}]",
                            "name=new-name:tag, name:tag or name@digest",
                        )
                    )
        if not _NAMESPACE.match(self.destination.namespace):
            bad.append(
                FieldViolation(
                    "application.destination.namespace", "not a valid Kubernetes namespace name"
                )
            )
        if self.revision_history_limit < 0:
            bad.append(FieldViolation("application.revision_history_limit", "must not be negative"))
        retry = self.sync_policy.retry
        if retry is not None:
            b = retry.backoff
            if b.duration < 0 or b.factor < 1 or b.max_duration < 0:
                bad.append(
                    FieldViolation(
                        "application.sync_policy.retry.backoff",
                        "duration and max_duration must be >= 0 and factor >= 1",
                    )
                )
        for i, rule in enumerate(self.ignore_differences):
            where = f"application.ignore_differences[{i}]"
            if not rule.kind:
                bad.append(FieldViolation(f"{where}.kind", "required field is missing"))
            if not rule.json_pointers:
                bad.append(FieldViolation(f"{where}.json_pointers", "name at least one pointer"))
            for j, ptr in enumerate(rule.json_pointers):
                if not ptr.startswith("/") or ptr == "/":
                    bad.append(
                        FieldViolation(
                            f"{where}.json_pointers[{j}]",
                            "not an RFC 6901 pointer like /spec/replicas",
                        )
                    )
        if bad:
            raise InvalidArgument(
                "invalid application: " + "; ".join(f"{v.field}: {v.description}" for v in bad),
                reason="INVALID_APPLICATION",
                field_violations=bad,
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for the store."""
        sp = self.sync_policy
        return {
            "name": self.name,
            "project": self.project,
            "source": self.source.to_dict(),
            "destination": _fields(self.destination),
            "sync_policy": {
                "automated": _fields(sp.automated) if sp.automated else None,
                "retry": {"limit": sp.retry.limit, "backoff": _fields(sp.retry.backoff)}
                if sp.retry
                else None,
                "detect_only": sp.detect_only,
            },
            "ignore_differences": [
                {**_fields(r), "json_pointers": list(r.json_pointers)}
                for r in self.ignore_differences
            ],
            "revision_history_limit": self.revision_history_limit,
            "create_time": self.create_time,
            "update_time": self.update_time,
            "owner": {
                **_fields(self.owner),
                "roles": list(self.owner.roles),
                "groups": list(self.owner.groups),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Application:
        """Inverse of ``to_dict``."""
        sp = d.get("sync_policy") or {}
        retry = sp.get("retry")
        owner = d.get("owner") or {"subject": ""}
        return cls(
            name=d["name"],
            project=d.get("project", "default"),
            source=Source.from_dict(d["source"]),
            destination=Destination(**d["destination"]),
            sync_policy=SyncPolicy(
                automated=Automated(**sp["automated"]) if sp.get("automated") else None,
                retry=Retry(retry["limit"], Backoff(**retry["backoff"])) if retry else None,
                detect_only=bool(sp.get("detect_only")),
            ),
            ignore_differences=tuple(
                IgnoreRule(**{**r, "json_pointers": tuple(r["json_pointers"])})
                for r in d.get("ignore_differences", ())
            ),
            revision_history_limit=int(d.get("revision_history_limit", 0)),
            create_time=float(d.get("create_time", 0.0)),
            update_time=float(d.get("update_time", 0.0)),
            owner=Owner(
                owner["subject"],
                owner.get("issuer", ""),
                tuple(owner.get("roles", ())),
                tuple(owner.get("groups", ())),
            ),
        )


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    """The sync status and health of one managed resource."""

    ref: Ref
    status: ResourceSync
    health: Health
    health_message: str = ""
    hook: bool = False
    wave: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "ref": self.ref.key,
            "status": self.status.value,
            "health": self.health.value,
            "health_message": self.health_message,
            "hook": self.hook,
            "wave": self.wave,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResourceStatus:
        """Inverse of ``to_dict``."""
        return cls(
            Ref.from_key(d["ref"]),
            ResourceSync(d["status"]),
            Health(d["health"]),
            d.get("health_message", ""),
            bool(d.get("hook")),
            int(d.get("wave", 0)),
        )


@dataclass(frozen=True, slots=True)
class Condition:
    """A problem that needs attention (Argo CD's application conditions)."""

    type: str
    message: str
    time: float


@dataclass(frozen=True, slots=True)
class AppStatus:
    """What the last reconcile observed."""

    sync: SyncCode = SyncCode.UNKNOWN
    revision: str = ""
    health: Health = Health.UNKNOWN
    health_message: str = ""
    resources: tuple[ResourceStatus, ...] = ()
    reconcile_time: float = 0.0
    conditions: tuple[Condition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "sync": self.sync.value,
            "revision": self.revision,
            "health": self.health.value,
            "health_message": self.health_message,
            "resources": [r.to_dict() for r in self.resources],
            "reconcile_time": self.reconcile_time,
            "conditions": [_fields(c) for c in self.conditions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppStatus:
        """Inverse of ``to_dict``."""
        return cls(
            SyncCode(d["sync"]),
            d.get("revision", ""),
            Health(d["health"]),
            d.get("health_message", ""),
            tuple(ResourceStatus.from_dict(r) for r in d.get("resources", ())),
            float(d.get("reconcile_time", 0.0)),
            tuple(Condition(**c) for c in d.get("conditions", ())),
        )


@dataclass(frozen=True, slots=True)
class ResourceResult:
    """What a sync did to one resource (or hook)."""

    ref: Ref
    code: ResultCode
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ref": self.ref.key, "code": self.code.value, "message": self.message}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResourceResult:
        """Inverse of ``to_dict``."""
        return cls(Ref.from_key(d["ref"]), ResultCode(d["code"]), d.get("message", ""))


@dataclass(frozen=True, slots=True)
class Operation:
    """A sync or rollback operation, running or finished."""

    id: str
    phase: Phase
    revision: str
    initiated_by: str
    start_time: float
    message: str = ""
    dry_run: bool = False
    prune: bool = False
    rollback_history_id: int = 0
    results: tuple[ResourceResult, ...] = ()
    end_time: float = 0.0
    retry_count: int = 0

    @property
    def done(self) -> bool:
        """Whether the operation has finished."""
        return self.phase not in (Phase.RUNNING, Phase.TERMINATING)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "phase": self.phase.value,
            "revision": self.revision,
            "initiated_by": self.initiated_by,
            "start_time": self.start_time,
            "message": self.message,
            "dry_run": self.dry_run,
            "prune": self.prune,
            "rollback_history_id": self.rollback_history_id,
            "results": [r.to_dict() for r in self.results],
            "end_time": self.end_time,
            "retry_count": self.retry_count,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Operation:
        """Inverse of ``to_dict``."""
        return cls(
            id=d["id"],
            phase=Phase(d["phase"]),
            revision=d["revision"],
            initiated_by=d["initiated_by"],
            start_time=float(d["start_time"]),
            message=d.get("message", ""),
            dry_run=bool(d.get("dry_run")),
            prune=bool(d.get("prune")),
            rollback_history_id=int(d.get("rollback_history_id", 0)),
            results=tuple(ResourceResult.from_dict(r) for r in d.get("results", ())),
            end_time=float(d.get("end_time", 0.0)),
            retry_count=int(d.get("retry_count", 0)),
        )


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One successful deployment: what was applied, when and by whom."""

    id: int
    revision: str
    manifest_digest: str
    deploy_time: float
    initiated_by: str
    source: Source

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "id": self.id,
            "revision": self.revision,
            "manifest_digest": self.manifest_digest,
            "deploy_time": self.deploy_time,
            "initiated_by": self.initiated_by,
            "source": self.source.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistoryEntry:
        """Inverse of ``to_dict``."""
        return cls(
            int(d["id"]),
            d["revision"],
            d["manifest_digest"],
            float(d["deploy_time"]),
            d["initiated_by"],
            Source.from_dict(d["source"]),
        )


def _values_violations(text: str) -> list[FieldViolation]:
    """Inline Helm values must be a YAML mapping."""
    import yaml

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return [FieldViolation("application.source.helm.values", f"invalid YAML{at}")]
    if loaded is not None and not isinstance(loaded, dict):
        return [FieldViolation("application.source.helm.values", "must be a YAML mapping")]
    return []


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}
