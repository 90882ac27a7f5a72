"""Two `autoecoops serve auth-service` processes behind one address list.

A user runs replicas as separate processes on distinct ports and lists them
in ``AUTOECOOPS_AUTH_SERVICE_ADDR``; policy-audit (its own process) reaches
them through the mesh's client factory, the test through the SDK. Calls are
spread over both (each process's Prometheus counter says how many it
served); after one replica is SIGKILLed, idempotent calls keep succeeding
through the other, and a non-idempotent call either succeeded once or failed
with UNAVAILABLE, after which its retry answers the truth (created, or
ALREADY_EXISTS because the first attempt had landed).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from autoecoops.kernel.mesh.config import SERVICES, MeshConfig
from autoecoops.kernel.mesh.errors import AlreadyExists, Unavailable
from autoecoops.sdk import Client, StaticToken
from tests.conftest import free_port
from tests.e2e.conftest import BIN, clean_env, serve, wait_serving

pytestmark = pytest.mark.e2e


def _served(metrics_port: int, method: str) -> int:
    """Calls of auth's ``method`` answered OK by the process on ``metrics_port``."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    pattern = (
        r"autoecoops_grpc_server_handled_total\{[^}]*grpc_code=\"OK\"[^}]*"
        rf"grpc_method=\"{method}\"[^}}]*\}} ([0-9.e+]+)"
    )
    return sum(int(float(v)) for v in re.findall(pattern, text))


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    base = clean_env()
    for svc in SERVICES:
        base[f"AUTOECOOPS_{svc.env}_PORT"] = str(free_port())
    base.update(
        {
            "REDIS_URL": redis_url,
            "AUTOECOOPS_KEY_PREFIX": prefix,
            "AUTOECOOPS_DATA_DIR": str(tmp_path / "data"),
        }
    )
    yield base
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def test_two_auth_service_processes_share_the_calls_and_survive_a_sigkill(
    env: dict[str, str], tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    metrics = [free_port(), free_port()]
    addr = ",".join(f"127.0.0.1:{p}" for p in ports)
    env["AUTOECOOPS_AUTH_SERVICE_ADDR"] = addr
    procs: list[subprocess.Popen[str]] = []
    try:
        # The first replica creates the signing keys in the shared data dir;
        # the second starts once they exist and loads the same ones.
        for i, (port, mport) in enumerate(zip(ports, metrics, strict=True)):
            own = {**env, "AUTOECOOPS_AUTH_SERVICE_PORT": str(port)}
            own["AUTOECOOPS_METRICS_PORT"] = str(mport)
            log = tmp_path / f"auth-{i}.log"
            procs.append(serve("auth-service", own, log))
            wait_serving(log, procs[-1])
        log = tmp_path / "policy-audit.log"
        procs.append(serve("policy-audit", env, log))
        wait_serving(log, procs[-1])
        token = subprocess.run(
            [str(BIN / "autoecoops"), "token", "--subject", "alice", "--roles", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

        with Client(
            addresses={"auth-service": addr.split(",")},
            config=MeshConfig(),
            credentials=StaticToken(token),
            timeout=30,
        ) as sdk:
            deadline = time.monotonic() + 60
            while min(_served(m, "ListRoles") for m in metrics) < 5:
                assert time.monotonic() < deadline, [_served(m, "ListRoles") for m in metrics]
                sdk.auth.list_roles(page_size=10)
            counts = [_served(m, "ListRoles") for m in metrics]
            for _ in range(40):
                sdk.auth.list_roles(page_size=10)
            after = [_served(m, "ListRoles") for m in metrics]
            # Round robin: both replicas took a share of the 40 calls.
            assert all(a - c >= 10 for a, c in zip(after, counts, strict=True)), (counts, after)

            # Load on both kinds of call while the first replica is SIGKILLed.
            stop = threading.Event()
            failures: list[BaseException] = []
            reads = [0]
            outcomes: dict[str, str] = {}

            def read() -> None:
                while not stop.is_set():
                    try:
                        sdk.auth.list_roles(page_size=10)
                        reads[0] += 1
                    except BaseException as err:  # collected, asserted below
                        failures.append(err)

            def create(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    name = f"replica-{worker}-{n}"
                    n += 1
                    role = {"name": name, "permissions": ["memory.documents.search"]}
                    try:
                        sdk.auth.create_role(role=role)
                        outcomes[name] = "created"
                    except Unavailable:
                        # It may or may not have landed: the retry says which.
                        try:
                            sdk.auth.create_role(role=role)
                            outcomes[name] = "created on retry"
                        except AlreadyExists:
                            outcomes[name] = "already there"
                    except BaseException as err:
                        failures.append(err)

            threads = [threading.Thread(target=read) for _ in range(2)]
            threads += [threading.Thread(target=create, args=(w,)) for w in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(30)
            at_kill = reads[0]
            # Keep the load on until the survivor has served a good run alone.
            deadline = time.monotonic() + 60
            while reads[0] < at_kill + 50 and not failures:
                assert time.monotonic() < deadline, "reads stalled after the SIGKILL"
                time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join(60)
            assert failures == [], failures
            assert outcomes, "no create ran"
            # Every role the answers said exists exists, once (names are unique).
            for name in outcomes:
                assert sdk.auth.get_role(name=name).role.name == name
            listed = sdk.auth.list_roles(page_size=1000).roles
            made = [r.name for r in listed if r.name.startswith("replica-")]
            assert sorted(made) == sorted(outcomes)
            # The survivor served everything after the kill.
            assert _served(metrics[1], "ListRoles") >= after[1] + 50
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_memory_hub_replica_loads_its_model_before_the_first_query(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A new replica loads its embedding model as soon as it serves. Left to the
    first search, that search waited for torch's import and the weights: seconds
    idle, and past its 30 s deadline on a loaded host (the scale-out test saw it)."""
    log = tmp_path / "memory-hub.log"
    proc = serve("memory-hub", env, log)
    try:
        wait_serving(log, proc)
        deadline = time.monotonic() + 120
        while "memory-hub: model all-MiniLM-L6-v2 loaded in" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
