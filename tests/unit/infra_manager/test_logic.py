"""infra-manager's logic without Redis, Git or gRPC: manifests, diff, health, decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.kernel.infra_manager import convert
from autoecoops.kernel.infra_manager.cluster import merge_apply, validate
from autoecoops.kernel.infra_manager.diff import compare, normalize, quantity, remove_pointer
from autoecoops.kernel.infra_manager.health import assess, worst
from autoecoops.kernel.infra_manager.manifests import (
    DeletePolicy,
    HookType,
    ManifestError,
    build,
    digest,
    is_tracked,
    parse_files,
    split_documents,
)
from autoecoops.kernel.infra_manager.model import (
    Application,
    Automated,
    Backoff,
    Destination,
    Health,
    IgnoreRule,
    ResourceSync,
    Retry,
    Source,
    SyncCode,
    SyncPolicy,
)
from autoecoops.kernel.infra_manager.reconcile import decide
from autoecoops.kernel.infra_manager.service import merge_update
from autoecoops.kernel.infra_manager.settings import InfraSettings
from autoecoops.kernel.infra_manager.source import GitError, classify
from autoecoops.kernel.infra_manager.sync import order_key
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError, InvalidArgument


def scope(group: str, kind: str) -> bool:
    return kind not in ("Namespace", "ClusterRole")


def parse(files: dict[str, str]) -> list[Any]:
    return build(parse_files({k: v.encode() for k, v in files.items()}), "web", "team-a", scope)


# -- manifests ------------------------------------------------------------------


def test_multi_document_files_lists_namespaces_waves_and_hooks() -> None:
    out = parse(
        {
            "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n---\n---\n"
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, namespace: ignored}\n",
            "b/c.json": '{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "other"}}]}',
            "hooks.yaml": "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n  annotations:\n"
            "    argocd.argoproj.io/hook: PreSync,PostSync\n    autoecoops.io/sync-wave: '-2'\n"
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: skipped\n  annotations: {autoecoops.io/hook: Skip}\n",
        }
    )
    by = {m.ref.name: m for m in out}
    assert set(by) == {"one", "team-a", "s", "j"}
    assert by["one"].ref.namespace == "team-a" and by["team-a"].ref.namespace == ""
    assert by["s"].ref.namespace == "other" and by["s"].where == "b/c.json#0.items[0]"
    assert by["j"].hooks == (HookType.PRE_SYNC, HookType.POST_SYNC) and by["j"].wave == -2
    assert by["j"].delete_policies == (DeletePolicy.BEFORE_HOOK_CREATION,)
    assert is_tracked(by["one"].obj, "web") and not is_tracked(by["one"].obj, "other")


def test_documents_keep_their_text_line_and_index() -> None:
    text = (
        "# a comment before the first document is no document\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {cpu: 500m}\n"
        "---\n"
        "---\n"
        "\n"
        "apiVersion: v1 # as written\nkind: ConfigMap\nmetadata: {name: b}\n"
        "...\n"
    )
    chunks = split_documents(text)
    assert [line for line, _t in chunks] == [3, 8, 10]
    assert (
        chunks[0][1] == "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {cpu: 500m}\n"
    )
    assert chunks[1][1] == ""  # the explicit empty document still counts, as load_all counts it
    assert chunks[2][1].startswith("apiVersion: v1 # as written\n")
    docs = parse_files({"d/x.yaml": text.encode()})
    assert [(d.where, d.path, d.index, d.line) for d in docs] == [
        ("d/x.yaml#0", "d/x.yaml", 0, 3),
        ("d/x.yaml#2", "d/x.yaml", 2, 10),
    ]
    assert docs[0].text.endswith("data: {cpu: 500m}\n")  # the quantity as written, not 0.5
    plain = parse_files({"p.yaml": b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\n"})
    assert (plain[0].index, plain[0].line) == (0, 1)
    # A syntax error in the second document names it and the line in the file.
    with pytest.raises(ManifestError) as err:
        parse_files(
            {"e.yaml": b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n---\nkind: [\n"}
        )
    (v,) = err.value.violations
    assert v.field == "e.yaml#1" and v.description.startswith("invalid YAML at line 6")


def test_every_bad_document_is_named_with_its_file_and_position() -> None:
    with pytest.raises(ManifestError) as err:
        parse(
            {
                "ok.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
                "broken.yaml": "a: [1,\n",
                "shape.yaml": "- just a list\n---\napiVersion: v1\nmetadata: {name: x}\n---\nkind: X\napiVersion: v1\nmetadata: {}\n",
            }
        )
    fields = {v.field: v.description for v in err.value.violations}
    assert fields["broken.yaml#0"].startswith("invalid YAML at line 2")
    assert fields["shape.yaml#0"] == "a manifest must be a mapping, not list"
    assert fields["shape.yaml#1"] == "no kind"
    assert fields["shape.yaml#2"] == "no metadata.name"
    with pytest.raises(ManifestError) as dup:
        parse(
            {
                "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
            }
        )
    assert "also declared at a.yaml#0" in dup.value.violations[0].description
    with pytest.raises(ManifestError) as wave:
        parse(
            {
                "a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, annotations: {autoecoops.io/sync-wave: soon}}\n"
            }
        )
    assert "not an integer" in wave.value.violations[0].description
    with pytest.raises(ManifestError) as utf:
        build(parse_files({"b.yaml": b"\xff\xfe"}), "web", "ns", scope)
    assert utf.value.violations[0].description == "not UTF-8 text"


def test_digest_ignores_file_layout() -> None:
    a = parse({"x.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n"})
    b = parse({"y/z.yml": "metadata: {name: a}\ndata: {k: v}\nkind: ConfigMap\napiVersion: v1\n"})
    c = parse({"x.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: w}\n"})
    assert digest(a) == digest(b) != digest(c)


def test_sync_order_is_wave_then_kind_then_name() -> None:
    out = parse(
        {
            "a.yaml": "\n---\n".join(
                f"apiVersion: {v}\nkind: {k}\nmetadata: {{name: {n}, annotations: {{autoecoops.io/sync-wave: '{w}'}}}}"
                for v, k, n, w in [
                    ("apps/v1", "Deployment", "b", 0),
                    ("v1", "Service", "z", 0),
                    ("v1", "ConfigMap", "late", 1),
                    ("example.com/v1", "Widget", "w", 0),
                    ("v1", "Namespace", "ns", 0),
                    ("apps/v1", "Deployment", "a", 0),
                ]
            )
        }
    )
    assert [m.ref.name for m in sorted(out, key=order_key)] == ["ns", "z", "a", "b", "w", "late"]


# -- diff -----------------------------------------------------------------------


def test_normalize_drops_server_fields_and_ignored_pointers() -> None:
    live = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "a~b",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "9",
            "managedFields": [{}],
            "creationTimestamp": "t",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
        },
        "data": {"a/b": "1", "keep": "2"},
        "status": {"x": 1},
    }
    rule = IgnoreRule("ConfigMap", json_pointers=("/data/a~1b",))
    assert normalize(live, [rule]) == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "a~b", "namespace": "ns"},
        "data": {"keep": "2"},
    }
    doc: dict[str, Any] = {"l": [{"a": 1, "b": 2}, {"a": 3}]}
    remove_pointer(doc, "/l/*/a")
    remove_pointer(doc, "/missing/x")
    remove_pointer(doc, "/l/7")
    assert doc == {"l": [{"b": 2}, {}]}


def test_quantities_compare_by_value() -> None:
    assert quantity("500m") == quantity("0.5") == quantity(0.5)
    assert quantity("1Gi") == quantity("1024Mi")
    assert quantity("1G") != quantity("1Gi")
    assert quantity("fast") == "fast"


def test_compare_missing_synced_and_out_of_sync_with_a_unified_diff() -> None:
    (m,) = parse({"a.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n"})
    assert compare(m, None, None).status is ResourceSync.MISSING
    live = {**m.obj, "metadata": {**m.obj["metadata"], "uid": "x"}, "data": {"k": "v"}}
    assert compare(m, live, live).status is ResourceSync.SYNCED
    edited = {**live, "data": {"k": "changed"}}
    d = compare(m, edited, merge_apply(edited, m.obj, m.obj))
    assert d.status is ResourceSync.OUT_OF_SYNC
    assert "-  k: changed" in d.text() and "+  k: v" in d.text()


def test_known_defaults_in_live_are_not_drift_but_changed_ones_are() -> None:
    (m,) = parse(
        {
            "svc.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80}]\n"
        }
    )
    live = normalize(m.obj)
    live["spec"].update(type="ClusterIP", clusterIP="10.0.0.7", sessionAffinity="None")
    live["spec"]["ports"][0].update(protocol="TCP", targetPort=80)
    assert compare(m, live, None).status is ResourceSync.SYNCED
    live["spec"]["type"] = "NodePort"
    assert compare(m, live, None).status is ResourceSync.OUT_OF_SYNC


# -- the embedded API server's apply --------------------------------------------


def test_merge_apply_keeps_other_writers_fields_and_drops_what_git_dropped() -> None:
    applied = {
        "metadata": {"name": "a", "labels": {"x": "1", "old": "y"}},
        "data": {"a": "1", "b": "2"},
    }
    live = {
        "metadata": {"name": "a", "uid": "u", "labels": {"x": "1", "old": "y", "ctl": "z"}},
        "data": {"a": "1", "b": "2"},
        "status": {"s": 1},
    }
    desired = {"metadata": {"name": "a", "labels": {"x": "2"}}, "data": {"a": "1"}}
    got = merge_apply(live, applied, desired)
    assert got == {
        "metadata": {"name": "a", "uid": "u", "labels": {"x": "2", "ctl": "z"}},
        "data": {"a": "1"},
        "status": {"s": 1},
    }


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"kind": "ConfigMap", "metadata": {"name": "Bad_Name", "namespace": "n"}}, "RFC 1123"),
        ({"kind": "ConfigMap", "metadata": {"name": "a", "namespace": ""}}, "metadata.namespace"),
        (
            {"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "n", "labels": {"v": 1}}},
            "labels[v]",
        ),
        (
            {
                "kind": "ConfigMap",
                "metadata": {"name": "a", "namespace": "n", "annotations": {"v": True}},
            },
            "annotations[v]",
        ),
        (
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "a", "namespace": "n"},
                "spec": {},
            },
            "spec.selector",
        ),
        (
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "a", "namespace": "n"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "c"}}},
                },
            },
            "does not match",
        ),
    ],
)
def test_the_embedded_api_server_validates_like_kubernetes(
    obj: dict[str, Any], problem: str
) -> None:
    message = validate(obj, namespaced=True)
    assert message is not None and problem in message


# -- health ----------------------------------------------------------------------


def dep(spec: dict[str, Any], status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "generation": generation},
        "spec": spec,
        "status": status,
    }


def test_health_rules() -> None:
    ready = {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
    assert assess(dep({"replicas": 3}, ready, 2))[0] is Health.HEALTHY
    assert (
        assess(dep({"replicas": 3}, {**ready, "observedGeneration": 1}, 2))[0] is Health.PROGRESSING
    )
    assert assess(dep({"replicas": 3, "paused": True}, ready, 2))[0] is Health.SUSPENDED
    stuck = {
        **ready,
        "updatedReplicas": 1,
        "conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
    }
    assert assess(dep({"replicas": 3}, stuck, 2))[0] is Health.DEGRADED
    assert (
        assess(dep({"replicas": 3}, {**ready, "availableReplicas": 2}, 2))[0] is Health.PROGRESSING
    )
    assert assess(dep({"replicas": 3}, {**ready, "replicas": 4}, 2))[0] is Health.PROGRESSING

    def kind(api: str, k: str, spec: dict[str, Any], status: dict[str, Any]) -> Health:
        return assess(
            {
                "apiVersion": api,
                "kind": k,
                "metadata": {"name": "x", "generation": 1},
                "spec": spec,
                "status": status,
            }
        )[0]

    assert (
        kind(
            "apps/v1", "StatefulSet", {"replicas": 2}, {"observedGeneration": 1, "readyReplicas": 1}
        )
        is Health.PROGRESSING
    )
    assert (
        kind(
            "apps/v1",
            "StatefulSet",
            {"replicas": 2},
            {
                "observedGeneration": 1,
                "readyReplicas": 2,
                "currentRevision": "a",
                "updateRevision": "a",
            },
        )
        is Health.HEALTHY
    )
    assert (
        kind(
            "apps/v1",
            "StatefulSet",
            {"replicas": 2},
            {
                "observedGeneration": 1,
                "readyReplicas": 2,
                "currentRevision": "a",
                "updateRevision": "b",
            },
        )
        is Health.PROGRESSING
    )
    assert (
        kind(
            "apps/v1",
            "DaemonSet",
            {},
            {
                "observedGeneration": 1,
                "desiredNumberScheduled": 3,
                "updatedNumberScheduled": 3,
                "numberAvailable": 2,
            },
        )
        is Health.PROGRESSING
    )
    assert (
        kind(
            "apps/v1",
            "DaemonSet",
            {},
            {
                "observedGeneration": 1,
                "desiredNumberScheduled": 3,
                "updatedNumberScheduled": 3,
                "numberAvailable": 3,
            },
        )
        is Health.HEALTHY
    )
    assert (
        kind("batch/v1", "Job", {}, {"conditions": [{"type": "Complete", "status": "True"}]})
        is Health.HEALTHY
    )
    assert (
        kind("batch/v1", "Job", {}, {"conditions": [{"type": "Failed", "status": "True"}]})
        is Health.DEGRADED
    )
    assert kind("batch/v1", "Job", {"suspend": True}, {}) is Health.SUSPENDED
    assert kind("batch/v1", "Job", {}, {}) is Health.PROGRESSING
    assert kind("v1", "Service", {"type": "LoadBalancer"}, {}) is Health.PROGRESSING
    assert (
        kind(
            "v1",
            "Service",
            {"type": "LoadBalancer"},
            {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
        )
        is Health.HEALTHY
    )
    assert kind("v1", "Service", {}, {}) is Health.HEALTHY
    assert kind("networking.k8s.io/v1", "Ingress", {}, {}) is Health.PROGRESSING
    assert (
        kind(
            "networking.k8s.io/v1",
            "Ingress",
            {},
            {"loadBalancer": {"ingress": [{"hostname": "h"}]}},
        )
        is Health.HEALTHY
    )
    assert kind("v1", "PersistentVolumeClaim", {}, {"phase": "Bound"}) is Health.HEALTHY
    assert kind("v1", "PersistentVolumeClaim", {}, {"phase": "Pending"}) is Health.PROGRESSING
    assert kind("v1", "PersistentVolumeClaim", {}, {"phase": "Lost"}) is Health.DEGRADED
    assert kind("example.com/v1", "Widget", {}, {}) is Health.HEALTHY
    assert (
        kind("apps/v1", "Deployment", {"replicas": "many"}, {"observedGeneration": 1})
        is Health.UNKNOWN
    )
    assert assess(None)[0] is Health.MISSING
    assert worst([Health.HEALTHY, Health.SUSPENDED, Health.PROGRESSING]) is Health.PROGRESSING
    assert worst([Health.MISSING, Health.DEGRADED]) is Health.DEGRADED
    assert worst([]) is Health.HEALTHY


# -- the automated-sync decision -------------------------------------------------


AUTO = Automated()


def app(automated: Automated | None = AUTO, detect_only: bool = False) -> Application:
    return Application(
        "web", Source("/r"), Destination("ns"), sync_policy=SyncPolicy(automated, None, detect_only)
    )


class D:
    def __init__(self, status: ResourceSync) -> None:
        self.status = status


def test_decide_follows_argo_cds_auto_sync_rules() -> None:
    out = [D(ResourceSync.OUT_OF_SYNC)]
    extra = [D(ResourceSync.EXTRANEOUS)]
    now = 1000.0
    ok = {"revision": "r1", "phase": "Succeeded", "end_time": 998.0, "automated": True}

    def d(
        a: Application,
        drifted: list[Any],
        last: dict[str, Any],
        rev: str = "r1",
        n: int = 1,
        **kw: Any,
    ) -> Any:
        return decide(
            a,
            SyncCode.OUT_OF_SYNC if drifted else SyncCode.SYNCED,
            drifted,
            n,
            rev,
            last,
            now,
            **kw,
        )  # type: ignore[arg-type]

    assert not d(app(None), out, {}).sync
    assert not d(app(), [], {}).sync
    assert d(app(), out, {}).sync  # never synced
    assert d(app(), out, ok, rev="r2").sync  # a new revision
    assert not d(app(), out, ok).sync  # drift at the synced revision, no selfHeal
    heal = app(Automated(self_heal=True))
    waiting = d(heal, out, ok, self_heal_timeout=5)
    assert not waiting.sync and waiting.recheck_in == pytest.approx(3.0)
    assert d(heal, out, ok, self_heal_timeout=1).sync
    assert not d(app(Automated(self_heal=True), detect_only=True), out, {}).sync
    assert not d(heal, out, {}, detect_only=True).sync
    failed = {**ok, "phase": "Failed"}
    refused = d(app(), out, failed)
    assert not refused.sync and refused.condition.startswith("SyncError")
    assert d(app(), out, {**failed, "automated": False}).sync  # a failed manual sync does not block
    assert not d(app(), extra, ok, rev="r2").sync  # extraneous only, prune off
    assert d(app(Automated(prune=True)), extra, ok, rev="r2").sync
    empty = d(app(Automated(prune=True)), extra, ok, rev="r2", n=0)
    assert not empty.sync and "allow_empty" in empty.condition
    assert d(app(Automated(prune=True, allow_empty=True)), extra, ok, rev="r2", n=0).sync


# -- spec, settings, sources, the edge ------------------------------------------


def test_application_validation_names_every_bad_field() -> None:
    bad = Application(
        "Web!",
        Source(""),
        Destination("Team_A"),
        revision_history_limit=-1,
        sync_policy=SyncPolicy(retry=Retry(1, Backoff(factor=0.5))),
        ignore_differences=(IgnoreRule("", json_pointers=("spec",)),),
    )
    with pytest.raises(InvalidArgument) as err:
        bad.validate()
    assert [v.field for v in err.value.field_violations] == [
        "application.name",
        "application.source.repo_url",
        "application.destination.namespace",
        "application.revision_history_limit",
        "application.sync_policy.retry.backoff",
        "application.ignore_differences[0].kind",
        "application.ignore_differences[0].json_pointers[0]",
    ]
    good = Application("web", Source("/r", "main", "deploy"), Destination("ns"))
    assert Application.from_dict(good.to_dict()) == good
    assert Backoff(1, 2, 5).delay(1) == 1 and Backoff(1, 2, 5).delay(4) == 5
    assert Retry(-1).allows(10**6) and not Retry(2).allows(2)


def test_settings_read_and_reject() -> None:
    s = InfraSettings.from_env(
        MeshConfig(data_dir=Path("/d")), {"AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS": "30"}
    )
    assert s.reconcile_interval == 30 and s.repo_cache_dir == Path("/d/infra-manager/repos")
    with pytest.raises(ConfigError, match="AUTOECOOPS_INFRA_MANAGER_CLUSTER"):
        InfraSettings.from_env(MeshConfig(), {"AUTOECOOPS_INFRA_MANAGER_CLUSTER": "nomad"})
    with pytest.raises(ConfigError, match="AUTOECOOPS_INFRA_MANAGER_WAVE_TIMEOUT_SECONDS"):
        InfraSettings.from_env(
            MeshConfig(), {"AUTOECOOPS_INFRA_MANAGER_WAVE_TIMEOUT_SECONDS": "-1"}
        )


def test_repository_urls_are_classified() -> None:
    cache = Path("/cache")
    assert classify("https://github.com/org/deploy.git", cache).remote
    assert classify("git@github.com:org/deploy.git", cache).remote
    assert classify("file:///srv/repo", cache).local
    assert not classify("/srv/repo", cache).remote
    for bad in ("", "relative/path", "ftp://x/y", "https:///nohost", "two words"):
        with pytest.raises(GitError) as err:
            classify(bad, cache)
        assert err.value.kind == "url"


def test_update_mask_merges_only_named_writable_fields() -> None:
    current = convert.application_pb(
        Application("web", Source("/r", "main", "a"), Destination("ns"))
    )
    patch = pb.Application(
        name="web", source=pb.ApplicationSource(path="b"), revision_history_limit=3
    )
    merged = merge_update(current, patch, field_mask_pb2.FieldMask(paths=["source.path"]))
    assert (merged.source.repo_url, merged.source.path, merged.revision_history_limit) == (
        "/r",
        "b",
        0,
    )
    with pytest.raises(InvalidArgument):
        merge_update(current, patch, field_mask_pb2.FieldMask(paths=["create_time"]))
    with pytest.raises(InvalidArgument):
        merge_update(current, patch, field_mask_pb2.FieldMask(paths=["source.nope"]))
    whole = merge_update(current, patch, field_mask_pb2.FieldMask())
    assert whole.revision_history_limit == 3 and whole.destination.namespace == ""
    back = convert.application_of(
        convert.application_pb(
            Application(
                "web",
                Source("/r"),
                Destination("ns"),
                sync_policy=SyncPolicy(Automated(True, True, False), Retry(3, Backoff(5, 2, 60))),
            )
        )
    )
    assert back.sync_policy == SyncPolicy(Automated(True, True, False), Retry(3, Backoff(5, 2, 60)))
