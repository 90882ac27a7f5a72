"""Desired versus live: a normalized comparison per resource.

The comparison is made between the live object and what the live object
would be after applying the desired manifest (the cluster's dry-run, as
Argo CD's server-side diff does), so fields the API server defaults or a
controller writes are on both sides and never show as drift. Both sides
are then normalized: ``status``, ``metadata.managedFields``,
``resourceVersion``, ``uid``, ``creationTimestamp``, ``generation`` and the
like are dropped, well-known defaulted fields are dropped from the live side
when the desired side does not set them, quantities are compared by value
(``500m`` equals ``0.5``), and the application's ``ignoreDifferences``
pointers are removed from both.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from autoecoops.kernel.infra_manager.manifests import Manifest, annotation, is_tracked
from autoecoops.kernel.infra_manager.model import IgnoreRule, Ref, ResourceSync

_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

#: Metadata the server owns; never drift.
_SERVER_METADATA = (
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
    "deletionGracePeriodSeconds",
    "ownerReferences",
)
#: Annotations that tools and controllers write.
_SERVER_ANNOTATIONS = (
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
)
#: Server-assigned values: dropped from live when the desired side lacks them.
ANY = object()
#: (group, kind) -> pointer patterns ('*' = every list item) -> default value.
KNOWN_DEFAULTS: Mapping[tuple[str, str], Mapping[str, object]] = {
    ("apps", "Deployment"): {
        "/spec/revisionHistoryLimit": 10,
        "/spec/progressDeadlineSeconds": 600,
        "/spec/strategy": ANY,
        "/spec/template/metadata/creationTimestamp": None,
        "/spec/template/spec/restartPolicy": "Always",
        "/spec/template/spec/terminationGracePeriodSeconds": 30,
        "/spec/template/spec/dnsPolicy": "ClusterFirst",
        "/spec/template/spec/schedulerName": "default-scheduler",
        "/spec/template/spec/securityContext": {},
        "/spec/template/spec/containers/*/terminationMessagePath": "/dev/termination-log",
        "/spec/template/spec/containers/*/terminationMessagePolicy": "File",
        "/spec/template/spec/containers/*/imagePullPolicy": ANY,
        "/spec/template/spec/containers/*/resources": {},
        "/spec/template/spec/containers/*/ports/*/protocol": "TCP",
    },
    ("", "Service"): {
        "/spec/type": "ClusterIP",
        "/spec/sessionAffinity": "None",
        "/spec/clusterIP": ANY,
        "/spec/clusterIPs": ANY,
        "/spec/ipFamilies": ANY,
        "/spec/ipFamilyPolicy": ANY,
        "/spec/internalTrafficPolicy": "Cluster",
        "/spec/ports/*/protocol": "TCP",
        "/spec/ports/*/targetPort": ANY,
    },
    ("", "ServiceAccount"): {"/secrets": ANY},
    ("batch", "Job"): {
        "/spec/backoffLimit": 6,
        "/spec/completions": 1,
        "/spec/parallelism": 1,
        "/spec/selector": ANY,
        "/spec/template/metadata/labels": ANY,
        "/spec/template/spec/restartPolicy": ANY,
    },
}
_QUANTITY_PARENTS = ("limits", "requests", "capacity", "hard")


def ident(ref: Ref) -> tuple[str, str, str, str]:
    """An object's identity: group, kind, namespace, name (the version is a view of it)."""
    return ref.group, ref.kind, ref.namespace, ref.name


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def remove_pointer(obj: Any, pointer: str) -> None:
    """Delete the RFC 6901 ``pointer`` from ``obj`` if it is there ('*' matches every item)."""
    parts = [_unescape(p) for p in pointer.split("/")[1:]]
    _remove(obj, parts)


def _remove(node: Any, parts: Sequence[str]) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        if head not in node:
            return
        if rest:
            _remove(node[head], rest)
        else:
            del node[head]
    elif isinstance(node, list):
        if head == "*":
            for item in node:
                if rest:
                    _remove(item, rest)
            return
        if not head.isdigit() or int(head) >= len(node):
            return
        if rest:
            _remove(node[int(head)], rest)
        else:
            del node[int(head)]


def _get(node: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    for p in parts:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            return False, None
    return True, node


def _expand(
    node: Any, parts: Sequence[str], prefix: tuple[str, ...] = ()
) -> Iterable[tuple[str, ...]]:
    """Concrete paths of a pattern with '*' list wildcards, present in ``node``."""
    if not parts:
        yield prefix
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, list):
            for i, item in enumerate(node):
                yield from _expand(item, rest, (*prefix, str(i)))
        return
    if isinstance(node, dict) and head in node:
        yield from _expand(node[head], rest, (*prefix, head))


def quantity(value: Any) -> Any:
    """A Kubernetes quantity as a number, so '500m' equals '0.5' and '1Gi' equals '1024Mi'."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    # Imported here: the kubernetes package costs a third of a second to import.
    from kubernetes.utils.quantity import parse_quantity

    try:
        return str(parse_quantity(value).normalize())  # type: ignore[no-untyped-call]
    except (ValueError, ArithmeticError):
        return value


def _quantities(node: Any, parent: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if parent in _QUANTITY_PARENTS and not isinstance(v, (dict, list)):
                node[k] = quantity(v)
            else:
                _quantities(v, k)
    elif isinstance(node, list):
        for item in node:
            _quantities(item, parent)


def normalize(
    obj: Mapping[str, Any], rules: Sequence[IgnoreRule] = (), *, quantities: bool = True
) -> dict[str, Any]:
    """A copy of ``obj`` without what never counts as drift.

    ``quantities`` False keeps quantities as written: the copy a diff shows.
    """
    out: dict[str, Any] = json.loads(json.dumps(obj))
    out.pop("status", None)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        for key in _SERVER_METADATA:
            meta.pop(key, None)
        for key in ("annotations", "labels"):
            values = meta.get(key)
            if isinstance(values, dict):
                for a in _SERVER_ANNOTATIONS:
                    values.pop(a, None)
            if not values:
                meta.pop(key, None)
    if quantities:
        _quantities(out)
    ref = Ref.of(out)
    for rule in rules:
        if rule.matches(ref):
            for pointer in rule.json_pointers:
                remove_pointer(out, pointer)
    return out


def align_quantities(target: Any, source: Any, parent: str = "") -> None:
    """Where a quantity in ``target`` equals ``source``'s by value, write it as ``source`` does.

    So a diff shows ``cpu: 500m`` as written in Git on both sides, and never
    a line for ``0.5`` versus ``500m``, which are the same amount.
    """
    if isinstance(target, dict) and isinstance(source, dict):
        for k, v in target.items():
            if k not in source:
                continue
            if parent in _QUANTITY_PARENTS and not isinstance(v, (dict, list)):
                if quantity(v) == quantity(source[k]):
                    target[k] = source[k]
            else:
                align_quantities(v, source[k], k)
    elif isinstance(target, list) and isinstance(source, list):
        for t, src in zip(target, source, strict=False):
            align_quantities(t, src, parent)


def strip_defaults(live: dict[str, Any], desired: Mapping[str, Any]) -> None:
    """Drop from ``live`` the known defaulted fields that ``desired`` does not set."""
    group = str(live.get("apiVersion", "")).rpartition("/")[0]
    table = KNOWN_DEFAULTS.get((group, str(live.get("kind", ""))))
    if not table:
        return
    for pattern, default in table.items():
        parts = pattern.split("/")[1:]
        for path in list(_expand(live, parts)):
            present, _ = _get(desired, path)
            if present:
                continue
            _, value = _get(live, path)
            if default is ANY or value == default:
                _remove(live, list(path))


def to_yaml(obj: Mapping[str, Any] | None) -> str:
    """Stable YAML for diffs ('' for None)."""
    if obj is None:
        return ""
    text: str = yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=True, default_flow_style=False)
    return text


def unified(ref: Ref, live: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> str:
    """A unified diff from live (---) to desired (+++)."""
    lines = difflib.unified_diff(
        to_yaml(live).splitlines(keepends=True),
        to_yaml(desired).splitlines(keepends=True),
        fromfile=f"live/{ref}",
        tofile=f"desired/{ref}",
    )
    return "".join(lines)


@dataclass(frozen=True, slots=True)
class ResourceDiff:
    """One resource's comparison; ``text`` renders the unified diff on demand."""

    ref: Ref
    status: ResourceSync
    #: The normalized live and desired objects (None when absent).
    live: dict[str, Any] | None
    desired: dict[str, Any] | None
    #: The live object as read (for health), and the manifest (for waves/hooks).
    raw_live: Mapping[str, Any] | None = None
    manifest: Manifest | None = None
    #: What the diff shows: the same, with quantities as written (None: ``live``/``desired``).
    shown_live: dict[str, Any] | None = None
    shown_desired: dict[str, Any] | None = None

    def text(self) -> str:
        """The unified diff; '' when synced."""
        if self.status is ResourceSync.SYNCED:
            return ""
        live = self.shown_live if self.shown_live is not None else self.live
        desired = self.shown_desired if self.shown_desired is not None else self.desired
        return unified(self.ref, live, desired)


def compare(
    manifest: Manifest,
    live: Mapping[str, Any] | None,
    predicted: Mapping[str, Any] | None,
    rules: Sequence[IgnoreRule] = (),
) -> ResourceDiff:
    """Compare one desired resource with its live object.

    ``predicted`` is the cluster's dry-run of applying ``manifest`` over
    ``live``; without it the raw manifest is the desired side.
    """
    if live is None:
        return ResourceDiff(
            manifest.ref,
            ResourceSync.MISSING,
            None,
            normalize(manifest.obj, rules),
            None,
            manifest,
            shown_desired=normalize(manifest.obj, rules, quantities=False),
        )
    source = predicted if predicted is not None else manifest.obj
    want = normalize(source, rules)
    have = normalize(live, rules)
    strip_defaults(have, want)
    status = ResourceSync.SYNCED if have == want else ResourceSync.OUT_OF_SYNC
    if status is ResourceSync.SYNCED:
        return ResourceDiff(manifest.ref, status, have, want, live, manifest)
    # Normalised only to compare: the diff shows the desired side as written in Git.
    shown_want = normalize(source, rules, quantities=False)
    align_quantities(shown_want, normalize(manifest.obj, rules, quantities=False))
    shown_have = normalize(live, rules, quantities=False)
    strip_defaults(shown_have, shown_want)
    align_quantities(shown_have, shown_want)
    return ResourceDiff(manifest.ref, status, have, want, live, manifest, shown_have, shown_want)


def extraneous(live: Mapping[str, Any], rules: Sequence[IgnoreRule] = ()) -> ResourceDiff:
    """A live object of the application that Git no longer declares."""
    return ResourceDiff(
        Ref.of(dict(live)),
        ResourceSync.EXTRANEOUS,
        normalize(live, rules),
        None,
        live,
        None,
        shown_live=normalize(live, rules, quantities=False),
    )


def diff_app(
    manifests: Sequence[Manifest],
    live: Mapping[tuple[str, str, str, str], Mapping[str, Any]],
    predicted: Mapping[Ref, Mapping[str, Any]],
    app: str,
    rules: Sequence[IgnoreRule] = (),
) -> list[ResourceDiff]:
    """Every resource of an application: desired ones (hooks excluded) and extraneous live ones.

    ``live`` maps identities to live objects: those the desired manifests
    name plus those the cluster lists as the application's.
    """
    out: list[ResourceDiff] = []
    declared: set[tuple[str, str, str, str]] = set()
    for m in manifests:
        if m.is_hook:
            continue
        key = ident(m.ref)
        declared.add(key)
        out.append(compare(m, live.get(key), predicted.get(m.ref), rules))
    for key, obj in live.items():
        if key in declared or annotation(obj, "hook") is not None:
            continue  # hooks come and go with their delete policy; they are never pruned
        if is_tracked(obj, app):
            out.append(extraneous(obj, rules))
    return out
