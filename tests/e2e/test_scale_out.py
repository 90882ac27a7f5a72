"""Two processes of every kernel service on a Redis Cluster; one of each SIGKILLed under load.

The issue's system test of scale-out (docs/scale.md). A real Redis Cluster
(three masters, three replicas) and ten `autoecoops serve` processes: two of
each kernel service, on distinct ports, every one reaching the others through
``AUTOECOOPS_<SERVICE>_ADDR`` lists of both replicas. Through the Python SDK
(the same lists) a mixed load runs: publishes to a partitioned topic
(idempotency keys), auth CreateRole (audited, not idempotent), memory-hub
searches, and infra-manager syncs of an application from a local Git
repository while both infra-manager replicas reconcile it every second and
auto-sync each new commit. Midway one process of each service is SIGKILLed,
staggered. Then:

- every idempotent call (searches, publishes, reads) succeeded through the
  SDK's retries;
- every CreateRole either succeeded, or failed UNAVAILABLE and its retry told
  the truth (created, or ALREADY_EXISTS because the first attempt had landed):
  each role exists once, and no unanswered one exists;
- every acknowledged event is in its partition's stream, once;
- every role that exists has its audit entry, and the log verifies
  (`autoecoops audit verify`);
- no two reconciles and no two operations of the application overlapped,
  judged from the lines both infra-manager processes log while they hold the
  lease (a reconcile or operation of the killed process ends at its kill).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autoecoops.auth.v1 import auth_pb2
from autoecoops.events.v1 import envelope_pb2
from autoecoops.events.v1 import events_pb2 as bus_pb2
from autoecoops.iaops.v1 import events_pb2 as iaops_events
from autoecoops.infra.v1 import infra_pb2 as infra
from autoecoops.kernel.mesh.config import SERVICES, MeshConfig
from autoecoops.kernel.mesh.errors import (
    AlreadyExists,
    AutoEcoOpsError,
    FailedPrecondition,
    Unavailable,
)
from autoecoops.kernel.mesh.redis import service_base
from autoecoops.memory.v1 import memory_pb2
from autoecoops.sdk import Client, StaticToken
from autoecoops.sdk.retry import Retry
from tests.cluster import LocalCluster
from tests.conftest import free_port
from tests.e2e.conftest import BIN, clean_env
from tests.integration.infra_manager.conftest import configmap
from tests.integration.infra_manager.gitrepo import GitRepo

pytestmark = pytest.mark.e2e

KERNEL = ("auth-service", "event-bus", "memory-hub", "policy-audit", "infra-manager")
PREFIX = "autoecoops-scale:"
#: A topic of the contracts that nothing else publishes to in this test (no iaops runs).
TOPIC = "iaops.artifact"
PARTITIONS = 4
APP = "web"
#: Seconds of load before the first kill, between kills, and after the last.
WARMUP, STAGGER, AFTER = 4.0, 1.0, 6.0
#: A log line of infra-manager: "2026-12-03 10:00:00,123 INFO autoecoops.infra_manager: ...".
LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO autoecoops\.infra_manager: "
    r"(reconcile|operation \S+) of (\S+) (started|ended) \(fence (\d+)(, lease lost)?\)$"
)


@dataclass
class Proc:
    """One `autoecoops serve` process."""

    service: str
    replica: int
    port: int
    log: Path
    popen: subprocess.Popen[str]
    #: time.time() of its SIGKILL, if it was killed.
    killed_at: float | None = None


@dataclass
class Load:
    """What the load threads did and were told."""

    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Idempotent calls that failed after the SDK's retries: must stay empty.
    failures: list[str] = field(default_factory=list)
    #: Acknowledged publishes: idempotency key -> (partition, event id).
    events: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: CreateRole: role name -> what the answers said.
    roles: dict[str, str] = field(default_factory=dict)
    #: Successful calls by kind, to show the load ran through the kills.
    done: dict[str, int] = field(default_factory=dict)
    #: Syncs: operation ids started by our calls, and calls told another was running.
    syncs: list[str] = field(default_factory=list)
    busy: int = 0

    def count(self, kind: str) -> None:
        """One more successful call of ``kind``."""
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1

    def fail(self, what: str, err: BaseException) -> None:
        """Record a call that must not have failed."""
        with self.lock:
            self.failures.append(f"{what}: {type(err).__name__}: {err}")


def _env(cluster: LocalCluster, tmp_path: Path) -> dict[str, str]:
    """What every process shares: the cluster, key prefix, data directory (auth's keys,
    the audit checkpoint key), the replica lists, and short leases and intervals."""
    env = clean_env()
    for svc in SERVICES:
        env[f"AUTOECOOPS_{svc.env}_PORT"] = str(free_port())
    env.update(
        {
            "REDIS_URL": cluster.url,
            "AUTOECOOPS_KEY_PREFIX": PREFIX,
            "AUTOECOOPS_DATA_DIR": str(tmp_path / "data"),
            # A killed replica's leases lapse within seconds, so the survivor takes its
            # applications over during the test; renewing every second keeps a lease
            # through the pauses of a loaded 2-core machine.
            "AUTOECOOPS_LEASE_TTL_SECONDS": "5",
            "AUTOECOOPS_LEASE_RENEW_SECONDS": "1",
            "AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS": "1",
            "AUTOECOOPS_INFRA_MANAGER_RECONCILE_JITTER_SECONDS": "0",
            "AUTOECOOPS_INFRA_MANAGER_TICK_SECONDS": "0.2",
            "AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS": "0.2",
            "AUTOECOOPS_INFRA_MANAGER_GIT_FETCH_SECONDS": "0",
        }
    )
    return env


def _spawn(service: str, replica: int, port: int, env: dict[str, str], tmp_path: Path) -> Proc:
    svc = next(s for s in SERVICES if s.name == service)
    own = {**env, f"AUTOECOOPS_{svc.env}_PORT": str(port)}
    # Each replica mirrors Git in a cache of its own, as each pod has its own disk.
    own["AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR"] = str(tmp_path / f"repos-{replica}")
    log = tmp_path / f"{service}-{replica}.log"
    popen = subprocess.Popen(
        [str(BIN / "autoecoops"), "serve", service],
        env=own,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Proc(service, replica, port, log, popen)


def _wait_serving(procs: list[Proc], within: float = 150) -> None:
    deadline = time.monotonic() + within
    waiting = list(procs)
    while waiting:
        for p in list(waiting):
            if "SERVING in" in p.log.read_text():
                waiting.remove(p)
            elif p.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{p.log.name} did not start:\n{p.log.read_text()}")
        time.sleep(0.2)


def _until(what: str, check: Callable[[], object], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        if check():
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


@contextlib.contextmanager
def _mesh(
    cluster: LocalCluster, tmp_path: Path
) -> Iterator[tuple[dict[str, list[Proc]], dict[str, str]]]:
    env = _env(cluster, tmp_path)
    ports = {s: [free_port(), free_port()] for s in KERNEL}
    for s in KERNEL:
        env[f"AUTOECOOPS_{next(x for x in SERVICES if x.name == s).env}_ADDR"] = ",".join(
            f"127.0.0.1:{p}" for p in ports[s]
        )
    procs: dict[str, list[Proc]] = {s: [] for s in KERNEL}
    try:
        # The first auth-service creates the signing keys in the shared data
        # directory; everyone else starts once they exist, all at once.
        procs["auth-service"].append(
            _spawn("auth-service", 0, ports["auth-service"][0], env, tmp_path)
        )
        _wait_serving(procs["auth-service"])
        rest = []
        for s in KERNEL:
            for i in range(2):
                if (s, i) != ("auth-service", 0):
                    rest.append(_spawn(s, i, ports[s][i], env, tmp_path))
                    procs[s].append(rest[-1])
        _wait_serving(rest)
        yield procs, env
    finally:
        every = [p for ps in procs.values() for p in ps]
        for p in every:
            if p.popen.poll() is None:
                p.popen.terminate()
        for p in every:
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                p.popen.kill()


def _publisher(sdk: Client, load: Load, worker: int) -> None:
    for n in itertools.count():
        if load.stop.is_set():
            return
        key = f"p{worker}-{n}-{uuid.uuid4().hex[:6]}"
        env = envelope_pb2.Envelope(
            source="//tests/e2e/scale-out",
            type="autoecoops.iaops.artifact.verified",
            idempotency_key=key,
            partition_key=f"order-{n % 16}",
        )
        env.data.Pack(iaops_events.ArtifactVerified(artifact_ref=f"registry.test/app:{n}"))
        try:
            reply = sdk.events.publish(topic=TOPIC, envelope=env)
        except AutoEcoOpsError as err:
            load.fail(f"publish {key}", err)
            continue
        with load.lock:
            load.events[key] = (reply.partition, reply.event_id)
        load.count("publish")


def _creator(sdk: Client, load: Load, worker: int) -> None:
    for n in itertools.count():
        if load.stop.is_set():
            return
        name = f"scale-{worker}-{n}"
        role = auth_pb2.Role(name=name, permissions=["memory.documents.search"])
        try:
            sdk.auth.create_role(role=role)
            outcome = "created"
        except Unavailable:
            # It may or may not have landed: the retry says which.
            try:
                sdk.auth.create_role(role=role)
                outcome = "created on retry"
            except AlreadyExists:
                outcome = "already there"
            except AutoEcoOpsError as err:
                load.fail(f"create_role {name} (retry)", err)
                continue
        except AutoEcoOpsError as err:
            load.fail(f"create_role {name}", err)
            continue
        with load.lock:
            load.roles[name] = outcome
        load.count("create_role")


def _searcher(sdk: Client, load: Load) -> None:
    queries = itertools.cycle(["disk pressure", "certificate expiry", "pod restarts", "latency"])
    while not load.stop.is_set():
        try:
            hits = sdk.memory.search(namespace="kb", query=next(queries), k=3)
        except AutoEcoOpsError as err:
            load.fail("search", err)
            continue
        if not hits.results:
            load.fail("search", AssertionError("no results"))
        load.count("search")


def _syncer(sdk: Client, load: Load, repo: GitRepo) -> None:
    for n in itertools.count(1):
        if load.stop.is_set():
            return
        repo.commit({"deploy/app.yaml": configmap("settings", {"v": str(n)})}, f"v{n}")
        try:
            reply = sdk.infra.sync_application(name=APP)
            with load.lock:
                load.syncs.append(reply.operation.id)
            load.count("sync")
        except FailedPrecondition as err:
            # True when an automated sync of the commit (or the one before) runs.
            if err.reason != "OPERATION_IN_PROGRESS":
                load.fail("sync", err)
            with load.lock:
                load.busy += 1
        except Unavailable:
            # Not resent (not idempotent): whatever it did shows in the operation
            # state, which the next sync or the final check reads.
            with load.lock:
                load.busy += 1
        except AutoEcoOpsError as err:
            load.fail("sync", err)
        try:
            sdk.infra.refresh_application(name=APP)
            load.count("refresh")
        except AutoEcoOpsError as err:
            load.fail("refresh", err)
        time.sleep(0.3)


Interval = tuple[float, float, str]


def _intervals(procs: list[Proc], what: str) -> tuple[list[Interval], int]:
    """Per application, when each reconcile (``what='reconcile'``) or operation ran,
    from the lines infra-manager logs while it holds the lease; and how many of
    them lost their lease (then their writes were refused by the fence)."""
    seen: list[Interval] = []
    lost = 0
    for p in procs:
        open_: dict[str, float] = {}
        for line in p.log.read_text().splitlines():
            m = LINE.match(line)
            if not m or not m.group(2).startswith(what) or m.group(3) != APP:
                continue
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            key = f"{m.group(2)}/{m.group(5)}"
            if m.group(4) == "started":
                open_[key] = at
            else:
                if m.group(6):
                    lost += 1
                    open_.pop(key, None)
                    continue
                seen.append((open_.pop(key), at, f"{p.log.name} {key}"))
        # Still running when the process died (or the test ended): until then.
        end = p.killed_at if p.killed_at is not None else time.time()
        seen += [(start, end, f"{p.log.name} {key} (cut)") for key, start in open_.items()]
    return sorted(seen), lost


def _assert_no_overlap(seen: list[Interval]) -> None:
    for (s1, e1, who1), (s2, _e2, who2) in itertools.pairwise(seen):
        # Log times have millisecond resolution.
        assert e1 <= s2 + 0.001, f"overlap: {who1} {s1:.3f}-{e1:.3f} and {who2} from {s2:.3f}"


def _stream_ids(cluster: LocalCluster) -> dict[int, set[str]]:
    """The entry ids of each partition's stream of TOPIC, read from the cluster."""
    base = service_base(PREFIX, "events", cluster=True).replace("{", "").replace("}", "")
    client = cluster.client()
    try:
        ids: dict[int, set[str]] = {}
        for p in range(PARTITIONS):
            entries = client.xrange(f"{base}:{{{TOPIC}:{p}}}") or []
            ids[p] = {i.decode() if isinstance(i, bytes) else str(i) for i, _ in entries}
        return ids
    finally:
        client.close()


def test_one_process_of_each_service_is_killed_under_mixed_load(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    with _mesh(redis_cluster, tmp_path) as (procs, env):
        token = subprocess.run(
            [str(BIN / "autoecoops"), "token", "--subject", "alice", "--roles", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        addresses = {s: [f"127.0.0.1:{p.port}" for p in procs[s]] for s in KERNEL}
        # Retries enough to outlast a replica's death and the health check noticing.
        retry = Retry(max_attempts=10)
        with Client(
            addresses=addresses,
            config=MeshConfig(),
            credentials=StaticToken(token),
            timeout=30,
            retry=retry,
        ) as sdk:
            _prepare(sdk, tmp_path)
            repo = GitRepo(tmp_path / "repo")
            repo.commit({"deploy/app.yaml": configmap("settings", {"v": "0"})}, "v0")
            sdk.infra.create_application(
                application=infra.Application(
                    name=APP,
                    source=infra.ApplicationSource(
                        repo_url=repo.url, target_revision="main", path="deploy"
                    ),
                    destination=infra.ApplicationDestination(namespace="scale"),
                    sync_policy=infra.SyncPolicy(automated=infra.SyncPolicyAutomated()),
                )
            )

            load = Load()
            threads = [threading.Thread(target=_publisher, args=(sdk, load, w)) for w in range(2)]
            threads += [threading.Thread(target=_creator, args=(sdk, load, w)) for w in range(2)]
            threads += [threading.Thread(target=_searcher, args=(sdk, load)) for _ in range(2)]
            threads += [threading.Thread(target=_syncer, args=(sdk, load, repo))]
            for t in threads:
                t.start()
            try:
                time.sleep(WARMUP)
                for s in KERNEL:
                    victim = procs[s][0]
                    victim.popen.send_signal(signal.SIGKILL)
                    victim.killed_at = time.time()
                    victim.popen.wait(30)
                    time.sleep(STAGGER)
                at_last_kill = dict(load.done)
                # Keep the load on until every kind has had a good run on the survivors.
                deadline = time.monotonic() + AFTER + 60
                while time.monotonic() < deadline:
                    fresh = {k: load.done.get(k, 0) - at_last_kill.get(k, 0) for k in load.done}
                    if time.monotonic() > deadline - 60 and min(fresh.values()) >= 3:
                        break
                    time.sleep(0.2)
            finally:
                load.stop.set()
                for t in threads:
                    t.join(60)
            assert not any(t.is_alive() for t in threads), "a load thread hangs"
            fresh = {k: load.done.get(k, 0) - at_last_kill.get(k, 0) for k in load.done}
            answers = {a: list(load.roles.values()).count(a) for a in set(load.roles.values())}
            print(f"calls: {load.done}; after the last kill: {fresh}; CreateRole: {answers}")
            print(f"syncs told another operation ran, or UNAVAILABLE: {load.busy}")
            assert load.failures == [], load.failures
            assert set(fresh) == {"publish", "create_role", "search", "sync", "refresh"}
            assert min(fresh.values()) >= 3, fresh

            _check_roles(sdk, load)
            _check_events(redis_cluster, load)
            _check_audit(sdk, load, env)
            _check_infra(sdk, procs["infra-manager"], repo)


def _prepare(sdk: Client, tmp_path: Path) -> None:
    """The topic (partitioned) and a memory namespace with a few documents."""
    sdk.events.create_topic(topic_id=TOPIC, topic=bus_pb2.Topic(partitions=PARTITIONS))
    sdk.memory.create_namespace(namespace=memory_pb2.Namespace(name="kb"))
    texts = {
        "disk": "When a node reports DiskPressure, prune unused images.",
        "tls": "A certificate expiry alert means cert-manager failed to renew.",
        "crash": "Pods restarting in a loop: read the previous container's logs.",
        "slow": "High p99 latency: look at the saturation of the database pool.",
    }
    sdk.memory.ingest_documents(
        namespace="kb",
        documents=[memory_pb2.Document(id=k, title=k, text=v) for k, v in texts.items()],
    )


def _check_roles(sdk: Client, load: Load) -> None:
    """Every answered CreateRole's role exists once; no unanswered one exists."""
    assert load.roles, "no role was created"
    listed: list[str] = []
    page = ""
    while True:
        reply = sdk.auth.list_roles(page_size=500, page_token=page)
        listed += [r.name for r in reply.roles if r.name.startswith("scale-")]
        page = reply.next_page_token
        if not page:
            break
    assert sorted(listed) == sorted(load.roles)


def _check_events(cluster: LocalCluster, load: Load) -> None:
    """Every acknowledged event is in its partition's stream, and each is there once."""
    streams = _stream_ids(cluster)
    missing = [k for k, (p, eid) in load.events.items() if eid not in streams.get(p, set())]
    assert missing == [], f"{len(missing)} acknowledged events are not in their streams"
    assert sum(len(ids) for ids in streams.values()) == len(load.events)


def _check_audit(sdk: Client, load: Load, env: dict[str, str]) -> None:
    """Every role created has its CreateRole entry in the audit log; the log verifies."""

    def entries() -> set[str]:
        found: set[str] = set()
        page = ""
        while True:
            reply = sdk.audit.list_entries(page_size=1000, page_token=page)
            for e in reply.entries:
                if e.service == "auth-service" and "CreateRole" in e.action:
                    found.add(e.resource.rsplit("/", 1)[-1])
            page = reply.next_page_token
            if not page:
                return found

    _until("every created role has its audit entry", lambda: set(load.roles) <= entries(), 60)

    def cli(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "autoecoops"), "audit", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"audit {args}: {done.stdout}{done.stderr}"
        return done.stdout

    note = str(Path(env["AUTOECOOPS_DATA_DIR"]) / "cp.note")
    key = str(Path(env["AUTOECOOPS_DATA_DIR"]) / "policy-audit" / "checkpoint.key.pub")
    cli("checkpoint", "-o", note)
    # From the cluster itself, and through the API (the surviving replica of the list).
    assert "OK: entries 0.." in cli("verify", "--checkpoint", note, "--key", key)
    out = cli("verify", "--api", "--key", key, "--checkpoint", note)
    assert "consistent with the kept checkpoint" in out and "OK: entries 0.." in out, out


def _check_infra(sdk: Client, procs: list[Proc], repo: GitRepo) -> None:
    """No two reconciles, and no two operations, of the application overlapped; the
    survivor brings it to the last commit."""
    head = repo.commit({"deploy/app.yaml": configmap("settings", {"v": "last"})}, "last")

    def synced() -> bool:
        app = sdk.infra.get_application(name=APP).application
        op = app.status.operation_state
        return (
            app.status.sync.status == infra.SYNC_STATUS_CODE_SYNCED
            and app.status.sync.revision == head
            and op.phase != infra.OPERATION_PHASE_RUNNING
        )

    _until("the survivor auto-syncs the last commit", synced, 60)
    reconciles, lost_r = _intervals(procs, "reconcile")
    operations, lost_o = _intervals(procs, "operation")
    print(
        f"reconciles: {len(reconciles)} ({lost_r} lost their lease), "
        f"operations: {len(operations)} ({lost_o} lost their lease)"
    )
    by_replica = {p.log.name: sum(p.log.name in w for *_, w in reconciles) for p in procs}
    assert all(by_replica.values()), by_replica  # both replicas reconciled it
    _assert_no_overlap(reconciles)
    _assert_no_overlap(operations)
