"""A real Redis Cluster for tests: three masters and three replicas on loopback.

``LocalCluster`` starts Debian's /usr/bin/redis-server six times in cluster
mode (its own ports and data directories under a temporary directory), joins
them with ``redis-cli --cluster create ... --cluster-replicas 1``, waits for
``cluster_state:ok`` and stops them all afterwards. The ``redis_cluster``
fixture (tests/conftest.py) gives a test one; this module is also a runner:

    .venv/bin/python -m tests.cluster -- .venv/bin/pytest -n 2 tests/integration

starts a cluster, runs the command with ``REDIS_URL=redis+cluster://...`` and
stops it. ``--suite`` runs the integration suite but for ``NOT_ON_CLUSTER``
(``./dev test`` does). Without a command it prints the URL and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster, key_slot

from tests.ports import free_ports

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


@dataclasses.dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    bus_port: int
    dir: Path
    argv: list[str] = dataclasses.field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        """A plain client of this node alone (CLUSTER, INFO, ROLE)."""
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

    @property
    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each."""

    def __init__(
        self,
        root: Path,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 3000,
    ) -> None:
        self.root = root
        self.masters = masters
        self.replicas = replicas
        # Failover takes about this long after a master dies. Shorter makes a
        # loaded 2-core machine fail over healthy masters that were merely slow.
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """The ``REDIS_URL`` of the cluster: every node is a seed."""
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes)

    def start(self, timeout: float = 60.0) -> str:
        """Start the servers, create the cluster, wait until it is ok; its URL."""
        count = self.masters * (1 + self.replicas)
        ports = free_ports(2 * count)
        for i in range(count):
            d = self.root / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            node = Node(ports[2 * i], ports[2 * i + 1], d)
            node.argv = [
                REDIS_SERVER,
                *("--port", str(node.port), "--bind", "127.0.0.1"),
                *("--cluster-enabled", "yes", "--cluster-port", str(node.bus_port)),
                *("--cluster-config-file", str(d / "nodes.conf")),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                *("--dir", str(d), "--save", "", "--appendonly", "no"),
                *("--logfile", str(d / "redis.log")),
            ]
            self._spawn(node)
            self.nodes.append(node)
        try:
            for node in self.nodes:
                self._wait(lambda n=node: bool(n.client().ping()), timeout, f"{node.addr} starts")
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(n.addr for n in self.nodes),
                    *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
            # Every replica attached and in sync, so a failover has somewhere to go.
            self._wait(self._replicas_synced, timeout, "replicas sync")
        except BaseException:
            self.stop()
            raise
        return self.url

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` and all 16384 slots."""

        def ok() -> bool:
            for n in self.nodes:
                if not n.alive:
                    continue
                info = n.client().cluster("info")
                if info.get("cluster_state") != "ok" or int(info["cluster_slots_ok"]) != 16384:
                    return False
            return True

        self._wait(ok, timeout, "cluster_state:ok")

    def _replicas_synced(self) -> bool:
        want = self.masters * self.replicas
        synced = 0
        for n in self.nodes:
            if n.alive and n.client().info("replication").get("role") == "master":
                info = n.client().info("replication")
                synced += sum(
                    1
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                )
        return synced >= want

    def master_for(self, key: str) -> Node:
        """The live node that is master of ``key``'s slot now."""
        slot = key_slot(key.encode())
        for n in self.nodes:
            if not n.alive:
                continue
            for start, end, master, *_ in n.client().cluster("slots"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(x for x in self.nodes if x.port == port)
        raise LookupError(f"no live node serves slot {slot}")

    def replicas_of(self, master: Node) -> list[Node]:
        """The nodes replicating ``master`` now."""
        info = master.client().info("replication")
        ports = {
            int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
        }
        return [n for n in self.nodes if n.port in ports]

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``: no shutdown, no final save (a crashed machine)."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def _spawn(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            node.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def restart(self, node: Node, timeout: float = 60.0) -> None:
        """Start a killed ``node`` again on its data: it rejoins as a replica of the
        master that replaced it (what a restarted pod does)."""
        self._spawn(node)
        self._wait(lambda: bool(node.client().ping()), timeout, f"{node.addr} restarts")

    def pause(self, node: Node) -> None:
        """SIGSTOP ``node``: it holds its connections but answers nothing (a hung machine)."""
        if node.proc is not None:
            node.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        """SIGCONT a paused ``node``."""
        if node.proc is not None:
            node.proc.send_signal(signal.SIGCONT)

    def client(self) -> RedisCluster:
        """A synchronous cluster client (for checks and cleanup)."""
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes])

    def stop(self) -> None:
        """Stop every server (SIGKILL: its data is throwaway) and wait for them."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.kill()
        for n in self.nodes:
            if n.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(timeout=10)

    @staticmethod
    def _wait(check: object, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < end:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError) as err:
                last = err
            time.sleep(0.1)
        raise TimeoutError(f"Redis Cluster: timed out waiting until {what} ({last})")


@contextlib.contextmanager
def local_cluster(root: Path | None = None, **kwargs: int) -> Iterator[LocalCluster]:
    """A started ``LocalCluster`` (in a fresh temporary directory unless ``root``)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-cluster-")))
        cluster = LocalCluster(root, **kwargs)
        cluster.start()
        stack.callback(cluster.stop)
        yield cluster


#: Integration tests the cluster run leaves out, each for a reason that is not
#: the cluster's: they never touch REDIS_URL's Redis for what they test.
NOT_ON_CLUSTER = {
    # Starts a cluster of its own and kills a master of it; already run once
    # by the main suite.
    "tests/integration/test_cluster_failover.py": "runs on a cluster of its own",
    # Stops, restarts and blocks a redis-server of their own (RedisProcess /
    # OwnRedis) to test outages of a single Redis; REDIS_URL is not used.
    "tests/integration/test_redis_outage.py": "tests a single redis-server of its own",
    "tests/integration/test_audit_faults.py::test_redis_stopped_mid_stream": (
        "stops a redis-server of its own"
    ),
    "tests/integration/event_bus/test_outage.py": "stops a redis-server of its own",
    # No Redis at all (manifest rendering, Checkov's agreement corpus): the
    # same on any Redis, and minutes of the run.
    "tests/integration/iaops/test_checkov.py": "no Redis",
    "tests/integration/infra_manager/test_render.py": "no Redis",
}


def suite_command(workers: str) -> list[str]:
    """The pytest command of the integration suite on a cluster."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", workers, "tests/integration"]
    for test in NOT_ON_CLUSTER:
        cmd += ["--deselect" if "::" in test else "--ignore", test]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster; run the command after ``--`` with REDIS_URL set, or wait."""
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("--suite", action="store_true", help="run the integration suite on it")
    parser.add_argument("-n", default="2", help="pytest-xdist workers for --suite")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command else []
    if args.suite:
        command = suite_command(args.n)
    with local_cluster() as cluster:
        if not command:
            print(f"REDIS_URL={cluster.url}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
            return 0
        print(f"== Redis Cluster up: REDIS_URL={cluster.url}", flush=True)
        env = {**os.environ, "REDIS_URL": cluster.url}
        return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
