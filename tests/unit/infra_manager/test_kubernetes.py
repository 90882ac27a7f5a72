"""KubernetesCluster against a recording API server on 127.0.0.1.

No real API server runs on these machines. This one answers discovery and
the object endpoints the way kube-apiserver does (paths, list shapes, Status
errors) and records every request, so the tests check what the official
client puts on the wire: server-side apply as a PATCH with
``application/apply-patch+yaml``, our field manager, forced conflicts,
``dryRun=All`` for diffs, label-selected lists and background deletes. The
sync engine then runs unchanged on top of it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from autoecoops.kernel.infra_manager.cluster import (
    ApplyError,
    ClusterUnavailable,
    KubernetesCluster,
)
from autoecoops.kernel.infra_manager.manifests import build, parse_files
from autoecoops.kernel.infra_manager.model import Phase, Ref
from autoecoops.kernel.infra_manager.sync import SyncEngine, SyncPlan, Timeouts

RESOURCES = {
    "/api/v1": [
        {
            "name": "configmaps",
            "singularName": "configmap",
            "namespaced": True,
            "kind": "ConfigMap",
        },
        {
            "name": "namespaces",
            "singularName": "namespace",
            "namespaced": False,
            "kind": "Namespace",
        },
    ],
    "/apis/apps/v1": [
        {
            "name": "deployments",
            "singularName": "deployment",
            "namespaced": True,
            "kind": "Deployment",
        },
    ],
}
PLURAL = {
    "configmaps": ("v1", "ConfigMap"),
    "namespaces": ("v1", "Namespace"),
    "deployments": ("apps/v1", "Deployment"),
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any


@dataclass
class FakeApiServer:
    """Objects by path, every request recorded, optional failures by name.

    Every write is also an event (with its resourceVersion) for watches;
    ``compacted`` is the oldest version a watch may resume from, as etcd
    compaction leaves it: older ones get 410 Gone. ``conflicts`` answers
    that many 409s to writes of a name before accepting one.
    """

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, int] = field(default_factory=dict)
    version: int = 0
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    compacted: int = 0
    #: Seconds a watch request stays open waiting for events before it ends.
    watch_hold: float = 0.3
    lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, type_: str, obj: dict[str, Any]) -> None:
        """Record a change for watchers (under ``lock``)."""
        self.events.append((int(obj["metadata"]["resourceVersion"]), type_, obj))


def _handler(state: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str, message: str) -> None:
            self._send(
                code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": message,
                    "reason": reason,
                    "code": code,
                },
            )

        def _record(self) -> tuple[str, dict[str, list[str]], Any]:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = yaml.safe_load(raw) if raw else None
            with state.lock:
                state.requests.append(
                    Recorded(
                        self.command, url.path, query, self.headers.get("Content-Type", ""), body
                    )
                )
            return url.path, query, body

        def do_GET(self) -> None:
            path, query, _ = self._record()
            if path == "/version":
                return self._send(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0"})
            if path == "/api":
                return self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
            if path == "/apis":
                gv = {"groupVersion": "apps/v1", "version": "v1"}
                return self._send(
                    200,
                    {
                        "kind": "APIGroupList",
                        "groups": [{"name": "apps", "versions": [gv], "preferredVersion": gv}],
                    },
                )
            if path in RESOURCES:
                return self._send(
                    200,
                    {
                        "kind": "APIResourceList",
                        "groupVersion": path.rsplit("/", 2)[-2] if "apis" in path else "v1",
                        "resources": RESOURCES[path],
                    },
                )
            parts = path.strip("/").split("/")
            plural = parts[-1]
            if plural in PLURAL and query.get("watch") == ["true"]:
                return self._watch(PLURAL[plural][1], query)
            if plural in PLURAL:  # a list across namespaces
                api_version, kind = PLURAL[plural]
                selector = query.get("labelSelector", [""])[0]
                items = []
                for obj in state.objects.values():
                    if obj["kind"] == kind and _selected(obj, selector):
                        item = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
                        items.append(item)
                return self._send(
                    200,
                    {
                        "kind": f"{kind}List",
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(state.version)},
                        "items": items,
                    },
                )
            obj = state.objects.get(path)
            if obj is None:
                return self._status(404, "NotFound", f"{parts[-2]} {parts[-1]!r} not found")
            return self._send(200, obj)

        def _watch(self, kind: str, query: dict[str, list[str]]) -> None:
            """A chunked stream of JSON events, as kube-apiserver sends a watch."""
            since = int(query.get("resourceVersion", ["0"])[0] or 0)
            selector = query.get("labelSelector", [""])[0]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(event: dict[str, Any]) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            if since < state.compacted:
                chunk(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "status": "Failure",
                            "reason": "Expired",
                            "code": 410,
                            "message": f"too old resource version: {since} ({state.compacted})",
                        },
                    }
                )
            else:
                deadline = time.monotonic() + state.watch_hold
                sent = since
                while time.monotonic() < deadline:
                    with state.lock:
                        fresh = [e for e in state.events if e[0] > sent]
                    for rv, type_, obj in fresh:
                        sent = rv
                        if obj["kind"] == kind and _selected(obj, selector):
                            chunk({"type": type_, "object": obj})
                    time.sleep(0.02)
                if query.get("allowWatchBookmarks") == ["true"]:
                    # The newest version scanned: every event up to it was sent
                    # (or filtered out), so a watch resumed from it misses nothing.
                    upto = sent
                    chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind,
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(upto)},
                            },
                        }
                    )
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_PATCH(self) -> None:
            path, query, body = self._record()
            name = path.rsplit("/", 1)[-1]
            if state.conflicts.get(name):
                state.conflicts[name] -= 1
                return self._status(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on {name}: the object has been modified",
                )
            if name in state.fail:
                code = state.fail[name]
                return self._status(
                    code,
                    "Invalid" if code == 422 else "InternalError",
                    f"{body['kind']} {name!r} is invalid: metadata.name: Invalid value",
                )
            obj = json.loads(json.dumps(body))
            with state.lock:
                state.version += 1
                obj["metadata"]["resourceVersion"] = str(state.version)
            obj["metadata"]["managedFields"] = [{"manager": query.get("fieldManager", [""])[0]}]
            if obj["kind"] == "Deployment":  # the controller, instantly
                n = obj["spec"].get("replicas", 1)
                obj["metadata"]["generation"] = 1
                obj["status"] = {
                    "observedGeneration": 1,
                    "replicas": n,
                    "updatedReplicas": n,
                    "availableReplicas": n,
                }
            if query.get("dryRun") != ["All"]:
                with state.lock:
                    existed = path in state.objects
                    state.objects[path] = obj
                    state.event("MODIFIED" if existed else "ADDED", obj)
            self._send(200, obj)

        def do_DELETE(self) -> None:
            path, _query, _ = self._record()
            name = path.rsplit("/", 1)[-1]
            if state.conflicts.get(name):
                state.conflicts[name] -= 1
                return self._status(409, "Conflict", f"{name}: the object has been modified")
            with state.lock:
                gone = state.objects.pop(path, None)
                if gone is not None:
                    state.version += 1
                    gone = {**gone, "metadata": {**gone["metadata"]}}
                    gone["metadata"]["resourceVersion"] = str(state.version)
                    state.event("DELETED", gone)
            if gone is None:
                return self._status(404, "NotFound", "not found")
            self._send(200, {"kind": "Status", "status": "Success"})

    return Handler


def _selected(obj: dict[str, Any], selector: str) -> bool:
    """``key=value`` or ``key`` (the label exists), as a labelSelector says."""
    labels = obj["metadata"].get("labels") or {}
    key, eq, value = selector.partition("=")
    if not key:
        return True
    return labels.get(key) == value if eq else key in labels


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, KubernetesCluster]]:
    from kubernetes import client

    state = FakeApiServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def factory() -> Any:
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{server.server_address[1]}"
        return client.ApiClient(conf)

    yield state, KubernetesCluster(factory, discovery_cache=str(tmp_path / "discovery.json"))
    server.shutdown()
    server.server_close()


def manifests(text: str) -> list[Any]:
    return build(
        parse_files({"m.yaml": text.encode()}), "web", "team-a", lambda g, k: k != "Namespace"
    )


DEPLOY = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: main, image: nginx}]}
"""


async def test_apply_is_a_server_side_apply_patch_and_dry_run_changes_nothing(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    (m,) = manifests(DEPLOY)
    predicted = await cluster.apply(m.obj, dry_run=True)
    assert predicted["metadata"]["managedFields"] == [{"manager": "autoecoops-infra-manager"}]
    assert state.objects == {}
    applied = await cluster.apply(m.obj)
    patch = [r for r in state.requests if r.method == "PATCH"]
    assert [r.path for r in patch] == ["/apis/apps/v1/namespaces/team-a/deployments/web"] * 2
    assert all(r.content_type == "application/apply-patch+yaml" for r in patch)
    assert patch[0].query["dryRun"] == ["All"]
    assert (
        patch[1].query["fieldManager"] == ["autoecoops-infra-manager"]
        and "dryRun" not in patch[1].query
    )
    assert patch[1].query["force"][0].lower() == "true"
    assert patch[1].body["metadata"]["labels"]["autoecoops.io/application"] == "web"
    assert applied["metadata"]["resourceVersion"] == "2"
    live = await cluster.get(Ref("apps", "v1", "Deployment", "team-a", "web"))
    assert live is not None and live["spec"]["replicas"] == 2


async def test_discovery_lists_gets_and_deletes(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    assert await cluster.namespaced("", "ConfigMap") is True
    assert await cluster.namespaced("", "Namespace") is False
    assert await cluster.namespaced("example.com", "Widget") is True  # unknown: assume namespaced
    for m in manifests(
        DEPLOY + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n"
    ):
        await cluster.apply(m.obj)
    listed = await cluster.list_app(
        "web", [("apps", "v1", "Deployment"), ("", "v1", "ConfigMap"), ("x.io", "v1", "Gone")]
    )
    assert sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in listed) == [
        ("apps/v1", "Deployment", "web"),
        ("v1", "ConfigMap", "settings"),
    ]
    lists = [
        r
        for r in state.requests
        if r.method == "GET" and r.path in ("/apis/apps/v1/deployments", "/api/v1/configmaps")
    ]
    assert {r.query["labelSelector"][0] for r in lists} == {"autoecoops.io/application=web"}
    missing = Ref("", "v1", "ConfigMap", "team-a", "nope")
    assert await cluster.get_many([missing]) == [None]
    assert await cluster.delete(Ref("", "v1", "ConfigMap", "team-a", "settings")) is True
    assert await cluster.delete(missing) is False
    (delete, *_) = [r for r in state.requests if r.method == "DELETE"]
    assert delete.query["propagationPolicy"] == ["Background"]


async def test_refusals_are_apply_errors_and_server_errors_are_unavailable(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    state.fail = {"bad": 422, "flaky": 500}
    bad = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "bad", "namespace": "team-a"},
    }
    with pytest.raises(ApplyError) as refused:
        await cluster.apply(bad)
    assert "is invalid" in refused.value.message
    with pytest.raises(ClusterUnavailable):
        await cluster.apply({**bad, "metadata": {"name": "flaky", "namespace": "team-a"}})
    with pytest.raises(ApplyError) as unknown:
        await cluster.apply(
            {
                "apiVersion": "x.io/v1",
                "kind": "Gone",
                "metadata": {"name": "a", "namespace": "team-a"},
            }
        )
    assert "no resource type Gone" in unknown.value.message


async def test_the_sync_engine_runs_on_the_kubernetes_backend(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    desired = manifests(
        DEPLOY + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n"
    )
    stale = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "old", "namespace": "team-a"},
    }
    (old,) = manifests(yaml.safe_dump(stale))
    await cluster.apply(old.obj)
    live = await cluster.list_app("web", [("", "v1", "ConfigMap")])
    engine = SyncEngine(cluster, Timeouts(wave=5, hook=5, poll=0.01))
    result = await engine.run(SyncPlan("web", desired, live, prune=True))
    assert result.phase is Phase.SUCCEEDED, result.message
    assert [(r.ref.name, r.code.value) for r in result.results] == [
        ("settings", "Synced"),
        ("web", "Synced"),
        ("old", "Pruned"),
    ]
    assert "/api/v1/namespaces/team-a/configmaps/old" not in state.objects


DEPLOYMENTS = ("apps", "v1", "Deployment")


async def _next_change(feed: Any, wanted: str) -> Any:
    """The next change of type ``wanted`` (others are skipped), within a few seconds."""
    for _ in range(50):
        change = await asyncio.wait_for(feed.__anext__(), 5)
        if change.type == wanted:
            return change
    raise AssertionError(f"no {wanted} change")


async def test_watch_lists_then_streams_changes_with_bookmarks_and_resumes(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    stop = threading.Event()
    feed = cluster.changes(lambda: {DEPLOYMENTS}, stop.is_set)
    first = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.3)  # listed and watching
    (m,) = manifests(DEPLOY)
    await cluster.apply(m.obj)
    added = await asyncio.wait_for(first, 5)
    assert (added.type, added.ref, added.apps) == (
        "ADDED",
        Ref("apps", "v1", "Deployment", "team-a", "web"),
        ("web",),
    )
    await cluster.apply({**m.obj, "spec": {**m.obj["spec"], "replicas": 3}})
    modified = await _next_change(feed, "MODIFIED")
    assert int(modified.resource_version) > int(added.resource_version)
    await cluster.delete(m.ref)
    deleted = await _next_change(feed, "DELETED")
    assert deleted.apps == ("web",)
    await asyncio.sleep(1.0)  # the server ends each watch; it is resumed, not relisted
    stop.set()
    await feed.aclose()

    gets = [
        r for r in state.requests if r.method == "GET" and r.path == "/apis/apps/v1/deployments"
    ]
    (listing, *watches) = gets
    assert "watch" not in listing.query
    assert listing.query["labelSelector"] == ["autoecoops.io/application"]
    assert len(watches) >= 2  # each watch ends (the server's timeout) and is resumed
    for w in watches:
        assert w.query["watch"] == ["true"] and w.query["allowWatchBookmarks"] == ["true"]
        assert w.query["labelSelector"] == ["autoecoops.io/application"]
    versions = [int(w.query["resourceVersion"][0]) for w in watches]
    assert versions == sorted(versions) and versions[-1] >= int(deleted.resource_version)


async def test_a_watch_answered_410_gone_relists_and_says_so(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    stop = threading.Event()
    feed = cluster.changes(lambda: {DEPLOYMENTS}, stop.is_set)
    pending = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.3)
    # etcd compacted past the watcher's version: its next watch gets 410 Gone.
    with state.lock:
        state.version += 5
        state.compacted = state.version
    relist = await asyncio.wait_for(pending, 5)
    assert relist.type == "RELIST"
    # After relisting it watches from the fresh version and sees new changes.
    (m,) = manifests(DEPLOY)
    await cluster.apply(m.obj)
    assert (await _next_change(feed, "ADDED")).ref.name == "web"
    stop.set()
    await feed.aclose()
    lists = [
        r
        for r in state.requests
        if r.path == "/apis/apps/v1/deployments" and "watch" not in r.query
    ]
    assert len(lists) == 2


async def test_writes_answered_409_conflict_are_retried(
    api: tuple[FakeApiServer, KubernetesCluster],
) -> None:
    state, cluster = api
    (m,) = manifests(DEPLOY)
    state.conflicts = {"web": 2}
    applied = await cluster.apply(m.obj)
    assert applied["metadata"]["name"] == "web"
    patches = [r for r in state.requests if r.method == "PATCH"]
    assert len(patches) == 3  # two conflicts, then the write
    state.conflicts = {"web": 1}
    assert await cluster.delete(m.ref) is True
    # A conflict that does not go away is the caller's, after a bounded number of tries.
    await cluster.apply(m.obj)
    state.conflicts = {"web": 100}
    before = len(state.requests)
    with pytest.raises(ApplyError) as err:
        await cluster.apply(m.obj)
    assert "has been modified" in err.value.message
    from autoecoops.kernel.infra_manager.cluster import CONFLICT_ATTEMPTS

    assert len(state.requests) - before == CONFLICT_ATTEMPTS
