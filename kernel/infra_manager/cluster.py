"""Live state: one cluster interface, two implementations.

``KubernetesCluster`` talks to a real API server with the official
``kubernetes`` client: server-side apply (field manager
``autoecoops-infra-manager``, conflicts forced, as Argo CD's SSA sync does),
the same apply with ``dryRun=All`` to predict the live object for diffing,
label-selected lists and background deletes. No API server runs on the
machines this project is developed on; the requests it sends are tested
against a recording HTTP server, everything above it against the embedded
cluster.

``EmbeddedCluster`` keeps objects in Redis for local use and tests, keyed by
group/version/kind/namespace/name, with a resourceVersion (one counter per
cluster, compare-and-set on every write), a generation that moves when
anything but metadata and status changes, and a status that only a
controller writes (``set_status``; or the simulated controllers when
``simulate_ready`` is on). Apply behaves like server-side apply with one
manager: fields the last apply set and the new one drops are removed, fields
others wrote are kept.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.infra_manager.health import ready_status
from autoecoops.kernel.infra_manager.manifests import APP_LABEL, CLUSTER_SCOPED
from autoecoops.kernel.infra_manager.model import Backoff, Ref

log = logging.getLogger("autoecoops.infra_manager")
FIELD_MANAGER = "autoecoops-infra-manager"
#: Attempts of a write the API server answers 409 Conflict to, and the wait between them.
CONFLICT_ATTEMPTS = 5
CONFLICT_BACKOFF = Backoff(duration=0.05, factor=2, max_duration=1.0)
#: How long one watch request lasts before it is resumed from its last version.
WATCH_SECONDS = 300
#: The wait before watching again after a failed watch or list.
WATCH_BACKOFF = Backoff(duration=1.0, factor=2, max_duration=30.0)
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SERVER_META = ("uid", "creationTimestamp", "resourceVersion", "generation", "managedFields")


class ApplyError(Exception):
    """The cluster refused an object (validation, a missing kind, a conflict)."""

    def __init__(self, ref: Ref, message: str) -> None:
        super().__init__(f"{ref}: {message}")
        self.ref = ref
        self.message = message


class ClusterUnavailable(Exception):
    """The cluster could not be reached; retry later."""


class Cluster(abc.ABC):
    """Where live objects are read, applied and deleted."""

    name: str = "in-cluster"

    @abc.abstractmethod
    async def namespaced(self, group: str, kind: str) -> bool:
        """Whether objects of this kind live in a namespace."""

    @abc.abstractmethod
    async def get_many(self, refs: Sequence[Ref]) -> list[dict[str, Any] | None]:
        """The live objects, None for those that do not exist."""

    @abc.abstractmethod
    async def list_app(
        self, app: str, kinds: Iterable[tuple[str, str, str]]
    ) -> list[dict[str, Any]]:
        """Every live object labelled as ``app``'s, among ``kinds`` (group, version, kind)."""

    @abc.abstractmethod
    async def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply ``obj``; with ``dry_run`` return what it would become."""

    @abc.abstractmethod
    async def delete(self, ref: Ref) -> bool:
        """Delete the object; False if it did not exist."""

    async def server_version(self) -> str:
        """The Kubernetes version the cluster reports ('' when unknown); Helm renders for it."""
        return ""

    def changes(
        self,
        kinds: Callable[[], set[tuple[str, str, str]]],
        stop: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Change]:
        """Live changes to objects of applications, as they happen, until ``stop()``.

        ``kinds`` names the (group, version, kind)s worth watching now; a
        backend that watches per kind asks it again after each relist.
        ``stop`` is polled at least every second: the follower ends by it,
        not by cancellation, which a client library caught in a blocking
        read can lose.
        """
        raise NotImplementedError

    async def get(self, ref: Ref) -> dict[str, Any] | None:
        """One live object, or None."""
        (obj,) = await self.get_many([ref])
        return obj

    async def predict_many(
        self,
        objs: Sequence[Mapping[str, Any]],
        live: Sequence[Mapping[str, Any] | None] = (),
    ) -> list[dict[str, Any] | None]:
        """What each object would become if applied now (a dry-run apply); None
        where the cluster refuses it, so the diff falls back to the manifest.
        ``live`` (the objects just read, same order) lets a backend skip a read."""

        async def one(obj: Mapping[str, Any]) -> dict[str, Any] | None:
            try:
                return await self.apply(obj, dry_run=True)
            except ApplyError:
                return None

        return list(await asyncio.gather(*(one(o) for o in objs)))


# -- the embedded cluster ------------------------------------------------------


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# Compare-and-set on the object's resourceVersion, then move the app index.
_CAS = """
local cur = redis.call('HGET', KEYS[1], 'rv')
if (cur or '') ~= ARGV[1] then return -1 end
local rv = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'obj', ARGV[2], 'rv', rv, 'applied', ARGV[3])
if KEYS[3] ~= KEYS[4] then redis.call('SREM', KEYS[3], ARGV[4]) end
if ARGV[5] == '1' then redis.call('SADD', KEYS[4], ARGV[4]) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*',
  't', ARGV[6], 'k', ARGV[4], 'rv', rv, 'a', ARGV[7])
return rv
"""
#: Entries kept in an embedded cluster's change feed (a watcher that falls
#: further behind relists, as one that gets 410 Gone from an API server).
FEED_LENGTH = 10_000


@dataclass(frozen=True, slots=True)
class Change:
    """One change to a live object, as a watch reports it."""

    #: ADDED, MODIFIED, DELETED, or RELIST: the watch restarted and anything
    #: may have changed meanwhile (every application should be compared).
    type: str
    ref: Ref | None = None
    #: The applications whose label the object carried before or after.
    apps: tuple[str, ...] = ()
    resource_version: str = ""


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _drop_unapplied(
    base: dict[str, Any], applied: Mapping[str, Any], desired: Mapping[str, Any]
) -> None:
    """Remove from ``base`` the fields the last apply set and this one no longer does."""
    for key, value in applied.items():
        if key not in desired:
            base.pop(key, None)
        elif (
            isinstance(value, dict)
            and isinstance(desired[key], dict)
            and isinstance(base.get(key), dict)
        ):
            _drop_unapplied(base[key], value, desired[key])


def _merge(base: dict[str, Any], desired: Mapping[str, Any]) -> None:
    for key, value in desired.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = _copy(value)


def merge_apply(
    live: Mapping[str, Any] | None, applied: Mapping[str, Any] | None, desired: Mapping[str, Any]
) -> dict[str, Any]:
    """What server-side apply with one manager makes of ``live``: ``desired`` over
    it, minus what the previous apply (``applied``) set and ``desired`` drops.
    Lists are atomic (replaced whole)."""
    base: dict[str, Any] = _copy(live) if live is not None else {}
    status = base.pop("status", None)
    meta_keep = {k: v for k, v in (base.get("metadata") or {}).items() if k in _SERVER_META}
    if applied:
        _drop_unapplied(base, applied, desired)
    _merge(base, desired)
    base.setdefault("metadata", {}).update(meta_keep)
    if status is not None:
        base["status"] = status
    return base


def validate(obj: Mapping[str, Any], namespaced: bool) -> str | None:
    """What the API server would reject ``obj`` for, or None."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return "metadata must be a mapping"
    name = meta.get("name", "")
    if not isinstance(name, str) or len(name) > 253 or not _SUBDOMAIN.match(name):
        return f"metadata.name: Invalid value {name!r}: a lowercase RFC 1123 subdomain is required"
    ns = meta.get("namespace") or ""
    if namespaced and not _LABEL.match(ns):
        return f"metadata.namespace: Invalid value {ns!r}"
    for key, value in (meta.get("labels") or {}).items():
        label_name = str(key).rpartition("/")[2]
        if not _LABEL_NAME.match(label_name):
            return f"metadata.labels: Invalid value {key!r}: not a valid label key"
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            return f"metadata.labels[{key}]: Invalid value {value!r}: must be a string of at most 63 characters"
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(value, str):
            return f"metadata.annotations[{key}]: Invalid value: must be a string"
    if "spec" in obj and not isinstance(obj["spec"], dict):
        return "spec must be a mapping"
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    if (group, obj.get("kind")) in (
        ("apps", "Deployment"),
        ("apps", "StatefulSet"),
        ("apps", "DaemonSet"),
    ):
        spec = obj.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector:
            return "spec.selector: Required value"
        if any(labels.get(k) != v for k, v in selector.items()):
            return "spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`"
        if (
            spec.get("replicas") is not None and not isinstance(spec["replicas"], int)
        ) or isinstance(spec.get("replicas"), bool):
            return f"spec.replicas: Invalid value {spec['replicas']!r}: must be an integer"
    return None


#: What the embedded cluster reports as its version (charts check it with kubeVersion).
EMBEDDED_KUBE_VERSION = "v1.30.0"


class EmbeddedCluster(Cluster):
    """A cluster whose objects live in Redis under ``<prefix>:{<name>}:``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        name: str = "in-cluster",
        *,
        simulate_ready: bool = False,
    ) -> None:
        self.redis = redis
        self.name = name or "in-cluster"
        # One hash tag per cluster: a CAS touches the object, the counter and two index sets.
        self._base = f"{prefix}:{{{self.name}}}"
        self.simulate_ready = simulate_ready
        self._cas = redis.register_script(_CAS)
        #: The change feed: one stream entry per write, in resourceVersion order.
        self._feed = f"{self._base}:changes"
        self._applied: OrderedDict[str, tuple[str, dict[str, Any] | None]] = OrderedDict()

    def _obj_key(self, ref: Ref) -> str:
        return f"{self._base}:obj:{ref.key}"

    async def server_version(self) -> str:
        """The Kubernetes version the embedded cluster stands in for."""
        return EMBEDDED_KUBE_VERSION

    def _index(self, app: str) -> str:
        return f"{self._base}:app:{app}"

    async def namespaced(self, group: str, kind: str) -> bool:
        """From the table of well-known cluster-scoped kinds."""
        return (group, kind) not in CLUSTER_SCOPED

    @staticmethod
    def _decode(
        raw: Mapping[bytes, bytes],
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
        if not raw:
            return None, None, ""
        obj = json.loads(raw[b"obj"])
        rv = raw[b"rv"].decode()
        obj.setdefault("metadata", {})["resourceVersion"] = rv
        applied = json.loads(raw[b"applied"]) if raw.get(b"applied") else None
        return obj, applied, rv

    async def _read(self, ref: Ref) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str]:
        raw: Mapping[Any, Any] = await self.redis.hgetall(self._obj_key(ref))  # type: ignore[misc]
        return self._decode(raw)

    async def get_many(self, refs: Sequence[Ref]) -> list[dict[str, Any] | None]:
        """One round trip for all of them."""
        if not refs:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.hgetall(self._obj_key(ref))
            raws = await pipe.execute()
        out: list[dict[str, Any] | None] = []
        for ref, raw in zip(refs, raws, strict=True):
            obj, applied, rv = self._decode(raw)
            if obj is not None:
                self._remember_applied(ref.key, rv, applied)
            out.append(obj)
        return out

    def _remember_applied(self, key: str, rv: str, applied: dict[str, Any] | None) -> None:
        # The last-applied record of objects just read, by resourceVersion, so a
        # prediction right after a read (every compare) needs no second read.
        self._applied[key] = (rv, applied)
        self._applied.move_to_end(key)
        while len(self._applied) > 50_000:
            self._applied.popitem(last=False)

    async def predict_many(
        self,
        objs: Sequence[Mapping[str, Any]],
        live: Sequence[Mapping[str, Any] | None] = (),
    ) -> list[dict[str, Any] | None]:
        """The dry-run of many applies, merged here; reads only what ``live`` lacks."""
        if not objs:
            return []
        refs = [Ref.of(dict(o)) for o in objs]
        known: dict[int, tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]] = {}
        for i, ref in enumerate(refs):
            current = live[i] if i < len(live) else None
            cached = self._applied.get(ref.key)
            if (
                current is not None
                and cached is not None
                and cached[0] == (current.get("metadata") or {}).get("resourceVersion")
            ):
                known[i] = (current, cached[1])
        missing = [i for i in range(len(refs)) if i not in known]
        if missing:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in missing:
                    pipe.hgetall(self._obj_key(refs[i]))
                raws = await pipe.execute()
            for i, raw in zip(missing, raws, strict=True):
                read, last_applied, _rv = self._decode(raw)
                known[i] = (read, last_applied)
        out: list[dict[str, Any] | None] = []
        for i, desired in enumerate(objs):
            current, applied = known[i]
            out.append(merge_apply(current, applied, desired) if current is not None else None)
        return out

    async def list_app(
        self, app: str, kinds: Iterable[tuple[str, str, str]] = ()
    ) -> list[dict[str, Any]]:
        """Every object in ``app``'s index (the store indexes the label on each write)."""
        members: set[Any] = await self.redis.smembers(self._index(app))  # type: ignore[misc]
        keys = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        objs = await self.get_many([Ref.from_key(k) for k in keys])
        return [o for o in objs if o is not None]

    async def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply with one field manager; a no-op apply writes nothing."""
        ref = Ref.of(dict(obj))
        problem = validate(obj, await self.namespaced(ref.group, ref.kind))
        if problem:
            raise ApplyError(ref, problem)
        desired = _copy(obj)
        for key in _SERVER_META:
            desired.get("metadata", {}).pop(key, None)
        desired.pop("status", None)
        for _attempt in range(20):
            live, applied, rv = await self._read(ref)
            merged = merge_apply(live, applied, desired)
            meta = merged["metadata"]
            if live is None:
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now_iso(), generation=1)
            elif _content(merged) != _content(live):
                meta["generation"] = int(live["metadata"].get("generation") or 1) + 1
            if self.simulate_ready:
                status = ready_status(merged)
                if status is not None:
                    merged["status"] = status
            if dry_run:
                return merged
            if live is not None and merged == live and applied == desired:
                return live
            got = await self._write(ref, merged, desired, rv, live)
            if got is not None:
                return got
        raise ClusterUnavailable(f"{ref}: too many concurrent writers")

    async def _write(
        self,
        ref: Ref,
        obj: dict[str, Any],
        applied: Mapping[str, Any] | None,
        expected_rv: str,
        old: Mapping[str, Any] | None,
    ) -> dict[str, Any] | None:
        obj = _copy(obj)
        obj["metadata"].pop("resourceVersion", None)
        old_app = ((old or {}).get("metadata", {}).get("labels") or {}).get(APP_LABEL, "")
        new_app = (obj["metadata"].get("labels") or {}).get(APP_LABEL, "")
        # The index keys must be named even when unused: the script's keys are its slot.
        old_key = self._index(old_app or new_app or "-")
        new_key = self._index(new_app or old_app or "-")
        rv = await self._cas(
            keys=[self._obj_key(ref), f"{self._base}:rv", old_key, new_key, self._feed],
            args=[
                expected_rv,
                json.dumps(obj, separators=(",", ":")),
                json.dumps(applied, separators=(",", ":")) if applied is not None else "",
                ref.key,
                "1" if new_app else "0",
                "ADDED" if old is None else "MODIFIED",
                ",".join(sorted({a for a in (old_app, new_app) if a})),
                str(FEED_LENGTH),
            ],
        )
        if int(rv) < 0:
            return None
        if old_app and not new_app:
            await self.redis.srem(self._index(old_app), ref.key)  # type: ignore[misc]
        obj["metadata"]["resourceVersion"] = str(rv)
        return obj

    async def update(self, ref: Ref, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a live object as another client would (kubectl edit, a controller).

        The last-applied record is kept, so the next apply restores what Git says.
        """
        for _attempt in range(20):
            live, applied, rv = await self._read(ref)
            if live is None:
                raise KeyError(str(ref))
            new = _copy(live)
            change(new)
            if _content(new) != _content(live):
                new["metadata"]["generation"] = int(live["metadata"].get("generation") or 1) + 1
            got = await self._write(ref, new, applied, rv, live)
            if got is not None:
                return got
        raise ClusterUnavailable(f"{ref}: too many concurrent writers")

    async def set_status(self, ref: Ref, status: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``status`` as the object's controller would."""

        def put(obj: dict[str, Any]) -> None:
            obj["status"] = _copy(status)

        return await self.update(ref, put)

    async def delete(self, ref: Ref) -> bool:
        """Delete the object and drop it from its application's index."""
        live, _applied, rv = await self._read(ref)
        if live is None:
            return False
        app = (live["metadata"].get("labels") or {}).get(APP_LABEL, "")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._obj_key(ref))
            if app:
                pipe.srem(self._index(app), ref.key)
            pipe.xadd(
                self._feed,
                {"t": "DELETED", "k": ref.key, "rv": rv, "a": app},
                maxlen=FEED_LENGTH,
                approximate=True,
            )
            await pipe.execute()
        return True

    async def changes(
        self,
        kinds: Callable[[], set[tuple[str, str, str]]] = set,
        stop: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Change]:
        """Follow the cluster's change feed (a Redis stream every write appends to).

        Starts at the newest entry; after a lost connection, or when the feed
        was trimmed past the last entry read, it yields RELIST first.
        """
        last = await self._feed_tail()
        while not stop():
            try:
                reply: Any = await self.redis.xread({self._feed: last}, count=500, block=1000)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
                await asyncio.sleep(1.0)
                last = await self._feed_tail()
                yield Change("RELIST")
                continue
            for _stream, entries in reply or ():
                first = True
                for entry_id, fields in entries:
                    if first and last != "0-0" and not await self._still_in_feed(last):
                        yield Change("RELIST")  # trimmed: entries between were lost
                    first = False
                    last = _text(entry_id)
                    f = {_text(k): _text(v) for k, v in fields.items()}
                    apps = tuple(a for a in f.get("a", "").split(",") if a)
                    yield Change(f["t"], Ref.from_key(f["k"]), apps, f.get("rv", ""))

    async def _feed_tail(self) -> str:
        newest = await self.redis.xrevrange(self._feed, count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def _still_in_feed(self, entry_id: str) -> bool:
        got = await self.redis.xrange(self._feed, min=entry_id, max=entry_id, count=1)
        return bool(got)

    async def clear(self) -> None:
        """Delete every object of this cluster (tests, `autoecoops` resets)."""
        keys = [k async for k in self.redis.scan_iter(match=f"{self._base}:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)


# -- Kubernetes ----------------------------------------------------------------


class KubernetesCluster(Cluster):
    """A real API server through the official client's DynamicClient.

    The client is synchronous; every call runs in a worker thread, at most
    ``parallel`` at a time.
    """

    def __init__(
        self,
        api_client_factory: Callable[[], Any],
        *,
        name: str = "in-cluster",
        field_manager: str = FIELD_MANAGER,
        parallel: int = 8,
        discovery_cache: str | None = None,
    ) -> None:
        self.name = name or "in-cluster"
        self._factory = api_client_factory
        #: Where the client caches API discovery (None: the system temp dir).
        self._discovery_cache = discovery_cache
        self._field_manager = field_manager
        self._dyn: Any = None
        self._lock = asyncio.Lock()
        self._sem = asyncio.Semaphore(parallel)

    @classmethod
    def from_kubeconfig(
        cls, kubeconfig: str = "", context: str = "", name: str = ""
    ) -> KubernetesCluster:
        """In-cluster config when running in a pod, else the kubeconfig (and context)."""

        def factory() -> Any:
            from kubernetes import client, config

            if not kubeconfig and not context:
                try:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]
                    return client.ApiClient()
                except config.ConfigException:
                    pass
            return config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig or None, context=context or None
            )

        return cls(factory, name=name or context or "in-cluster")

    async def _client(self) -> Any:
        if self._dyn is None:
            async with self._lock:
                if self._dyn is None:
                    from kubernetes.dynamic import DynamicClient

                    def build() -> Any:
                        return DynamicClient(  # type: ignore[no-untyped-call]
                            self._factory(), cache_file=self._discovery_cache
                        )

                    try:
                        self._dyn = await asyncio.to_thread(build)
                    except Exception as err:
                        raise ClusterUnavailable(
                            f"cannot reach the Kubernetes API: {err}"
                        ) from None
        return self._dyn

    async def _call(self, fn: Callable[[], Any]) -> Any:
        async with self._sem:
            return await asyncio.to_thread(fn)

    async def _resource(self, group: str, version: str, kind: str, ref: Ref | None = None) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        dyn = await self._client()
        api_version = f"{group}/{version}" if group else version
        try:
            return await self._call(lambda: dyn.resources.get(api_version=api_version, kind=kind))
        except ResourceNotFoundError:
            raise ApplyError(
                ref or Ref(group, version, kind, "", ""),
                f"the server has no resource type {kind} in {api_version}",
            ) from None

    async def _retry_conflicts(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn``; again, after a short backoff, while the server answers 409 Conflict.

        A write races another writer of the same object ("the object has
        been modified"); the next attempt reads the new state. Anything else,
        and the last conflict, goes to the caller.
        """
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await self._call(fn)
            except Exception as err:
                if getattr(err, "status", None) != 409 or attempt == CONFLICT_ATTEMPTS:
                    raise
                await asyncio.sleep(CONFLICT_BACKOFF.delay(attempt))
        raise AssertionError("unreachable")

    async def changes(
        self,
        kinds: Callable[[], set[tuple[str, str, str]]] = set,
        stop: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Change]:
        """The watch API, one list-then-watch per kind the applications use.

        Each kind is listed once (labelled objects only), then watched from
        the list's resourceVersion with bookmarks, resuming from the last
        version seen when a watch ends; a 410 Gone (the version was
        compacted away) relists and yields RELIST, since changes may have
        been missed. The watches run in threads of their own (the client
        is blocking), never in the shared executor.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Change] = asyncio.Queue()
        halt = threading.Event()
        workers: dict[tuple[str, str, str], threading.Thread] = {}

        def put(change: Change) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, change)

        dyn = await self._client()
        try:
            while not stop():
                for gvk in sorted(kinds()):
                    if gvk in workers and workers[gvk].is_alive():
                        continue
                    try:
                        res = await self._resource(*gvk)
                    except ApplyError:
                        continue  # a kind the server does not serve (yet)
                    worker = threading.Thread(
                        target=self._watch_kind,
                        args=(dyn, res.path(), put, halt),
                        name=f"infra-manager-watch-{gvk[2]}",
                        daemon=True,
                    )
                    workers[gvk] = worker
                    worker.start()
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if getter not in done:
                    getter.cancel()
                    continue
                yield getter.result()
                while not queue.empty():
                    yield queue.get_nowait()
        finally:
            halt.set()

    def _watch_kind(
        self, dyn: Any, path: str, put: Callable[[Change], None], halt: threading.Event
    ) -> None:
        """List, then watch ``path`` until ``halt``; blocking, in its own thread."""
        rv = ""
        listed_once = False
        failures = 0
        while not halt.is_set():
            try:
                if not rv:
                    rv = self._list_version(dyn, path)
                    if listed_once:
                        put(Change("RELIST"))  # what happened between is unknown
                    listed_once = True
                rv = self._watch_once(dyn, path, rv, put, halt)
                failures = 0
            except Exception as err:
                if getattr(err, "status", None) == 410:
                    rv = ""  # too old: relist
                    continue
                failures += 1
                # Forbidden or unreachable: say so, and back off (the interval still reconciles).
                log.warning("watch of %s failed (%s); retrying", path, err)
                halt.wait(WATCH_BACKOFF.delay(failures))

    def _list_version(self, dyn: Any, path: str) -> str:
        resp = dyn.request(
            "get", path, serialize=False, label_selector=APP_LABEL, limit=1, _request_timeout=30
        )
        body = json.loads(resp.data)
        return str(body.get("metadata", {}).get("resourceVersion") or "0")

    def _watch_once(
        self,
        dyn: Any,
        path: str,
        rv: str,
        put: Callable[[Change], None],
        halt: threading.Event,
    ) -> str:
        """One watch request from ``rv``; returns the version to resume from ('' to relist)."""
        from kubernetes.watch.watch import iter_resp_lines

        resp = dyn.request(
            "get",
            path,
            serialize=False,
            label_selector=APP_LABEL,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if halt.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                meta = obj.get("metadata") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return ""
                    raise ClusterUnavailable(f"watch of {path}: {obj.get('message', obj)}")
                rv = str(meta.get("resourceVersion") or rv)
                if kind == "BOOKMARK":
                    continue
                app = (meta.get("labels") or {}).get(APP_LABEL, "")
                with contextlib.suppress(KeyError):
                    put(Change(str(kind), Ref.of(obj), (app,) if app else (), rv))
        finally:
            resp.release_conn()
        return rv

    async def server_version(self) -> str:
        """``gitVersion`` from the API server's /version ('' if it cannot be read)."""
        try:
            dyn = await self._client()
            version = await self._call(lambda: dyn.version)
            return str(version["kubernetes"]["gitVersion"])
        except Exception:
            return ""

    async def namespaced(self, group: str, kind: str) -> bool:
        """From API discovery; unknown kinds (a CRD applied in the same sync) count as namespaced."""
        dyn = await self._client()
        found = await self._call(lambda: dyn.resources.search(group=group, kind=kind))
        for r in found:
            if getattr(r, "namespaced", None) is not None:
                return bool(r.namespaced)
        return (group, kind) not in CLUSTER_SCOPED

    def _error(self, ref: Ref, err: Exception) -> Exception:
        status = getattr(err, "status", None)
        body = getattr(err, "body", None) or ""
        message = str(err)
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            message = json.loads(body).get("message", message)
        if isinstance(status, int) and 400 <= status < 500:
            return ApplyError(ref, message)
        return ClusterUnavailable(f"{ref}: {message}")

    async def get_many(self, refs: Sequence[Ref]) -> list[dict[str, Any] | None]:
        """GET each object (404 is None)."""
        from kubernetes.dynamic.exceptions import NotFoundError

        async def one(ref: Ref) -> dict[str, Any] | None:
            try:
                res = await self._resource(ref.group, ref.version, ref.kind, ref)
            except ApplyError:
                return None  # a kind the server does not serve has no objects
            try:
                got = await self._call(
                    lambda: res.get(name=ref.name, namespace=ref.namespace or None)
                )
            except NotFoundError:
                return None
            except Exception as err:
                raise self._error(ref, err) from None
            out: dict[str, Any] = got.to_dict()
            return out

        return list(await asyncio.gather(*(one(r) for r in refs)))

    async def list_app(
        self, app: str, kinds: Iterable[tuple[str, str, str]]
    ) -> list[dict[str, Any]]:
        """A label-selected list per kind, in every namespace."""
        out: list[dict[str, Any]] = []
        for group, version, kind in sorted(set(kinds)):
            try:
                res = await self._resource(group, version, kind)
            except ApplyError:
                continue
            try:
                listed = await self._call(
                    functools.partial(res.get, label_selector=f"{APP_LABEL}={app}")
                )
            except Exception as err:
                raise self._error(Ref(group, version, kind, "", ""), err) from None
            for item in listed.to_dict().get("items", []):
                # List items carry no apiVersion/kind of their own.
                item.setdefault("apiVersion", f"{group}/{version}" if group else version)
                item.setdefault("kind", kind)
                out.append(item)
        return out

    async def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """PATCH with ``application/apply-patch+yaml``, forcing conflicts, as our field manager."""
        ref = Ref.of(dict(obj))
        res = await self._resource(ref.group, ref.version, ref.kind, ref)
        dyn = await self._client()
        body = dict(obj)
        try:
            got = await self._retry_conflicts(
                lambda: dyn.server_side_apply(
                    res,
                    body=body,
                    name=ref.name,
                    namespace=ref.namespace or None,
                    field_manager=self._field_manager,
                    force_conflicts=True,
                    dry_run="All" if dry_run else None,
                )
            )
        except Exception as err:
            raise self._error(ref, err) from None
        out: dict[str, Any] = got.to_dict()
        return out

    async def delete(self, ref: Ref) -> bool:
        """DELETE with background propagation (dependents go after the owner)."""
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            res = await self._resource(ref.group, ref.version, ref.kind, ref)
        except ApplyError:
            return False
        try:
            await self._retry_conflicts(
                lambda: res.delete(
                    name=ref.name,
                    namespace=ref.namespace or None,
                    propagation_policy="Background",
                )
            )
        except NotFoundError:
            return False
        except Exception as err:
            raise self._error(ref, err) from None
        return True
