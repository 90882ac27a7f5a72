"""Plain YAML manifests: parsing, validation, hooks, waves and tracking.

A directory of ``.yaml``/``.yml``/``.json`` files, each possibly holding
several documents (``---``), becomes a list of ``Manifest``. Every document
must be a mapping with ``apiVersion``, ``kind`` and ``metadata.name``; a
document that fails is reported with its file and position, and the whole
set is refused: an unreadable manifest is never skipped silently.

Annotations follow Argo CD so existing repositories work: ``sync-wave``,
``hook`` and ``hook-delete-policy`` under ``autoecoops.io/`` or
``argocd.argoproj.io/`` (ours wins when both are set).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.errors import FieldViolation

#: The label that marks an object as managed by an application (for listing).
APP_LABEL = "autoecoops.io/application"
#: ``<app>:<group>/<kind>:<namespace>/<name>``: proves the object is the one
#: this application declared, not a copy that carries the label.
TRACKING_ANNOTATION = "autoecoops.io/tracking-id"
_PREFIXES = ("autoecoops.io/", "argocd.argoproj.io/")

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Kinds without a namespace; the Kubernetes backend also asks discovery.
CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset(
    {
        ("", "Namespace"),
        ("", "Node"),
        ("", "PersistentVolume"),
        ("storage.k8s.io", "StorageClass"),
        ("storage.k8s.io", "CSIDriver"),
        ("storage.k8s.io", "CSINode"),
        ("storage.k8s.io", "VolumeAttachment"),
        ("rbac.authorization.k8s.io", "ClusterRole"),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding"),
        ("apiextensions.k8s.io", "CustomResourceDefinition"),
        ("scheduling.k8s.io", "PriorityClass"),
        ("admissionregistration.k8s.io", "MutatingWebhookConfiguration"),
        ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration"),
        ("admissionregistration.k8s.io", "ValidatingAdmissionPolicy"),
        ("admissionregistration.k8s.io", "ValidatingAdmissionPolicyBinding"),
        ("apiregistration.k8s.io", "APIService"),
        ("networking.k8s.io", "IngressClass"),
        ("node.k8s.io", "RuntimeClass"),
        ("certificates.k8s.io", "CertificateSigningRequest"),
        ("kyverno.io", "ClusterPolicy"),
    }
)


class HookType(StrEnum):
    """When a hook runs (Argo CD's hook types)."""

    PRE_SYNC = "PreSync"
    SYNC = "Sync"
    POST_SYNC = "PostSync"
    SYNC_FAIL = "SyncFail"
    SKIP = "Skip"


class DeletePolicy(StrEnum):
    """When a hook object is deleted."""

    HOOK_SUCCEEDED = "HookSucceeded"
    HOOK_FAILED = "HookFailed"
    BEFORE_HOOK_CREATION = "BeforeHookCreation"


class ManifestError(Exception):
    """The manifests cannot be used; every violation names its file and document."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__(
            "invalid manifests: "
            + "; ".join(f"{v.field}: {v.description}" for v in self.violations[:10])
            + (f" (and {len(self.violations) - 10} more)" if len(self.violations) > 10 else "")
        )


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed YAML document and where it came from (``file#index``)."""

    where: str
    obj: dict[str, Any]
    #: The file it came from (for Helm, the template named by ``# Source:``).
    path: str = ""
    #: Its position among that file's documents, from 0.
    index: int = 0
    #: The 1-based line where it starts in the file; 0 when unknown (rendered output).
    line: int = 0
    #: The document as written (or rendered): what GetManifests shows.
    text: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    """One desired object, ready to apply."""

    ref: Ref
    #: The object as it will be applied: namespace defaulted, tracking added.
    obj: dict[str, Any]
    #: ``file#index`` in the repository.
    where: str
    wave: int = 0
    #: Hook types; empty for a plain resource.
    hooks: tuple[HookType, ...] = ()
    delete_policies: tuple[DeletePolicy, ...] = ()

    @property
    def is_hook(self) -> bool:
        """Whether this is a hook rather than a managed resource."""
        return bool(self.hooks)


def annotation(obj: Mapping[str, Any], name: str) -> str | None:
    """The value of ``autoecoops.io/<name>`` or else ``argocd.argoproj.io/<name>``."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    for prefix in _PREFIXES:
        value = annotations.get(prefix + name)
        if value is not None:
            return str(value)
    return None


def split_documents(text: str) -> list[tuple[int, str]]:
    """The documents of a YAML stream as ``(first line, text)``, in order, lines 1-based.

    Split on ``---`` (and ``...``) lines the way a YAML parser counts
    documents, so the n-th chunk is ``load_all``'s n-th document: comments
    before the first ``---`` are no document, an explicit empty one is. Each
    chunk keeps its text as written, so a reader sees the manifest exactly as
    it is in Git (or as Helm rendered it) and errors point at real lines.
    """
    lines = text.splitlines(keepends=True)
    out: list[tuple[int, str]] = []
    start, explicit = 0, False
    current: list[str] = []

    def push() -> None:
        if explicit or any(_content(line) for line in current):
            body = list(current)
            first = start
            while body and not body[0].strip():  # the document starts at its first text
                body.pop(0)
                first += 1
            out.append((first + 1, "".join(body)))

    for i, line in enumerate(lines):
        bare = line.rstrip("\r\n")
        if _SEPARATOR.match(bare):
            push()
            rest = bare[3:]
            # '--- {a: 1}' or '--- !!map': the document begins on the separator's line.
            current = (
                [rest.lstrip() + "\n"] if rest.strip() and not rest.strip().startswith("#") else []
            )
            start, explicit = (i if current else i + 1), True
        elif _DOC_END.match(bare):
            push()
            start, current, explicit = i + 1, [], False
        else:
            current.append(line)
    push()
    return out


_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")
_DOC_END = re.compile(r"^\.\.\.[ \t]*(?:#.*)?$")


def _content(line: str) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith(("#", "%"))


def parse_files(files: Mapping[str, bytes]) -> list[Document]:
    """Every document of every file, in path order; ``ManifestError`` naming each bad one."""
    bad: list[FieldViolation] = []
    docs: list[Document] = []
    for path in sorted(files):
        try:
            text = files[path].decode("utf-8")
        except UnicodeDecodeError:
            bad.append(FieldViolation(path, "not UTF-8 text"))
            continue
        parse_stream(path, text, docs, bad)
    if bad:
        raise ManifestError(bad)
    return docs


def parse_stream(
    path: str,
    text: str,
    docs: list[Document],
    bad: list[FieldViolation],
    *,
    lines: bool = True,
    counters: dict[str, int] | None = None,
) -> None:
    """Append the documents of one YAML stream from ``path``; a bad one goes to ``bad``.

    ``lines`` False when the stream's lines are not the file's (rendered
    output): errors then name the document only, and ``line`` stays 0.
    ``counters`` numbers documents per ``path`` across calls (Helm renders
    one template's documents one after another).
    """
    for n, (line, chunk) in enumerate(split_documents(text)):
        index = n if counters is None else counters.get(path, 0)
        if counters is not None:
            counters[path] = index + 1
        where = f"{path}#{index}"
        try:
            doc = yaml.load(chunk, Loader=_Loader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = ""
            if mark is not None:
                at = (
                    f" at line {line + mark.line}, column {mark.column + 1}"
                    if lines
                    else f" at line {mark.line + 1} of the document, column {mark.column + 1}"
                )
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            bad.append(FieldViolation(where, f"invalid YAML{at}: {problem}"))
            continue
        if doc is None:
            continue  # an empty document between two '---' is allowed
        at_line = line if lines else 0
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "List"
            and isinstance(doc.get("items"), list)
        ):
            for j, item in enumerate(doc["items"]):
                item_text = (
                    yaml.safe_dump(item, sort_keys=False, default_flow_style=False)
                    if isinstance(item, dict)
                    else ""
                )
                _collect(
                    Document(f"{where}.items[{j}]", item, path, index, at_line, item_text),
                    docs,
                    bad,
                )
            continue
        _collect(Document(where, doc, path, index, at_line, chunk), docs, bad)


def _collect(doc: Document, docs: list[Document], bad: list[FieldViolation]) -> None:
    where, obj = doc.where, doc.obj
    if not isinstance(obj, dict):
        bad.append(FieldViolation(where, f"a manifest must be a mapping, not {type(obj).__name__}"))
        return
    problems = []
    if not isinstance(obj.get("apiVersion"), str) or not obj["apiVersion"]:
        problems.append("no apiVersion")
    if not isinstance(obj.get("kind"), str) or not obj["kind"]:
        problems.append("no kind")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        problems.append("no metadata.name")
    elif meta.get("namespace") is not None and not isinstance(meta["namespace"], str):
        problems.append("metadata.namespace is not a string")
    if problems:
        bad.append(FieldViolation(where, "; ".join(problems)))
        return
    docs.append(doc)


def build(
    docs: Iterable[Document],
    app: str,
    namespace: str,
    namespaced: Callable[[str, str], bool],
) -> list[Manifest]:
    """Resolve namespaces, waves and hooks, and add the tracking label and annotation."""
    bad: list[FieldViolation] = []
    out: list[Manifest] = []
    seen: dict[Ref, str] = {}
    for doc in docs:
        # A private deep copy with YAML dates and the like as strings, as the API
        # server would see them after JSON encoding.
        obj = json.loads(json.dumps(doc.obj, default=str))
        group, _, _version = obj["apiVersion"].rpartition("/")
        meta = obj["metadata"]
        if namespaced(group, obj["kind"]):
            meta["namespace"] = meta.get("namespace") or namespace
        else:
            meta.pop("namespace", None)
        ref = Ref.of(obj)
        wave_text = annotation(obj, "sync-wave")
        hook_text = annotation(obj, "hook")
        policy_text = annotation(obj, "hook-delete-policy")
        try:
            wave = int(wave_text) if wave_text is not None else 0
        except ValueError:
            bad.append(FieldViolation(doc.where, f"sync-wave {wave_text!r} is not an integer"))
            continue
        hooks = tuple(_enum(HookType, hook_text, doc.where, "hook", bad)) if hook_text else ()
        policies = (
            tuple(_enum(DeletePolicy, policy_text, doc.where, "hook-delete-policy", bad))
            if policy_text
            else ()
        )
        if HookType.SKIP in hooks:
            continue  # Argo CD's Skip: in Git, never applied
        if hooks and not policies:
            policies = (DeletePolicy.BEFORE_HOOK_CREATION,)
        if ref in seen:
            bad.append(FieldViolation(doc.where, f"{ref} is also declared at {seen[ref]}"))
            continue
        seen[ref] = doc.where
        meta.setdefault("labels", {})
        if meta["labels"] is None:
            meta["labels"] = {}
        meta["labels"][APP_LABEL] = app
        if not isinstance(meta.get("annotations"), dict):
            meta["annotations"] = {}
        meta["annotations"][TRACKING_ANNOTATION] = tracking_id(app, ref)
        out.append(Manifest(ref, obj, doc.where, wave, hooks, policies))
    if bad:
        raise ManifestError(bad)
    return out


def _enum(
    kind: type[StrEnum], text: str, where: str, name: str, bad: list[FieldViolation]
) -> list[Any]:
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(kind(part))
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            bad.append(FieldViolation(where, f"{name} {part!r} is not one of {allowed}"))
    return values


def tracking_id(app: str, ref: Ref) -> str:
    """The tracking annotation value of ``ref`` in ``app`` (version-independent)."""
    return f"{app}:{ref.group}/{ref.kind}:{ref.namespace}/{ref.name}"


def is_tracked(obj: Mapping[str, Any], app: str) -> bool:
    """Whether a live object belongs to ``app`` (label and matching tracking id)."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(APP_LABEL) != app:
        return False
    return (meta.get("annotations") or {}).get(TRACKING_ANNOTATION) == tracking_id(
        app, Ref.of(dict(obj))
    )


def digest(manifests: Iterable[Manifest]) -> str:
    """``sha256:<hex>`` of the manifests, independent of file layout and key order."""
    h = hashlib.sha256()
    for m in sorted(manifests, key=lambda m: m.ref):
        h.update(json.dumps(m.obj, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def to_documents(manifests: Iterable[Manifest]) -> list[Document]:
    """The manifests as documents again (history stores what was applied)."""
    return [Document(m.where, m.obj) for m in manifests]
