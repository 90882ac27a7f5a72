"""machine-ops end to end: a real agent process against real service processes.

auth-service, policy-audit, event-bus and machine-ops each run as
`autoecoops serve` (so machine-ops alone can be stopped and started again),
on free ports, over the shared Redis under this test's key prefix. The agent
is `autoecoops agent`; the test drives it with the `autoecoops node` CLI and
reads the truth from /proc/sys and /etc itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import SERVICES
from tests.conftest import free_port
from tests.e2e.conftest import BIN

KERNEL = ["auth-service", "policy-audit", "event-bus"]


class Procs:
    """The service processes and the agent, with one environment."""

    def __init__(self, tmp: Path, redis_url: str, key_prefix: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOECOOPS_")}
        for svc in SERVICES:
            self.env[f"AUTOECOOPS_{svc.env}_PORT"] = str(free_port())
        self.env.update(
            AUTOECOOPS_DATA_DIR=str(tmp / "data"),
            REDIS_URL=redis_url,
            AUTOECOOPS_KEY_PREFIX=key_prefix,
            AUTOECOOPS_MACHINEOPS_HEARTBEAT_SECONDS="1",
            AUTOECOOPS_SHUTDOWN_GRACE_SECONDS="1",
            AUTOECOOPS_DRAIN_DELAY_SECONDS="0",
        )
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def serve(self, name: str) -> None:
        proc = subprocess.Popen(
            [str(BIN / "autoecoops"), "serve", name],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        deadline, out = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "SERVING in" in line:
                self.procs[name] = proc
                return
        proc.kill()
        raise AssertionError(f"{name} did not start:\n" + "".join(out))

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

    def agent(self, node: str, secret: str, evaluate_interval: str = "0.5") -> None:
        secret_file = self.tmp / "enroll-secret"
        secret_file.write_text(secret)
        self.procs["agent"] = subprocess.Popen(
            [
                str(BIN / "autoecoops"),
                "agent",
                "--node",
                node,
                "--enroll-secret-file",
                str(secret_file),
                "--state-dir",
                str(self.tmp / "agent"),
                "--evaluate-interval",
                evaluate_interval,
                "--inventory-interval",
                "3600",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "agent.log", "a"),  # noqa: SIM115 - closed with the process
            text=True,
        )

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "autoecoops"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        if done.returncode:
            raise AssertionError(f"autoecoops {args} failed: {done.stderr}")
        return done.stdout

    def close(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


@pytest.fixture
def procs(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Procs]:
    p = Procs(tmp_path, redis_url, key_prefix)
    try:
        for name in KERNEL:
            p.serve(name)
        p.serve("machine-ops")
        yield p
    finally:
        p.close()


def wait(pred, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def truth(control: dict) -> tuple[str, str] | None:
    """(status, observed) as the test reads this machine, for the kinds it can read."""
    check = control["check"]
    kind, key, expected = check["kind"], check["key"], check.get("expected", "")
    if kind == "CHECK_KIND_SYSCTL":
        path = Path("/proc/sys") / key.replace(".", "/")
        if not path.exists():
            return "RESULT_STATUS_FAIL", "(absent)"
        value = " ".join(path.read_text().split())
        ok = (
            re.search(expected, value)
            if check.get("operator") == "OPERATOR_MATCHES"
            else value == expected
        )
        return ("RESULT_STATUS_PASS" if ok else "RESULT_STATUS_FAIL"), value
    if kind == "CHECK_KIND_FILE_MODE":
        if not Path(key).exists():
            return (
                "RESULT_STATUS_PASS" if check.get("pass_if_missing") else "RESULT_STATUS_FAIL"
            ), "(absent)"
        mode = stat.S_IMODE(os.stat(key).st_mode)
        ok = mode & ~int(expected, 8) == 0
        return ("RESULT_STATUS_PASS" if ok else "RESULT_STATUS_FAIL"), f"{mode:04o}"
    return None


def outbox(state: Path) -> tuple[set[int], int, int]:
    """(buffered sequences, the next sequence, dropped) from the agent's outbox."""
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True)
    try:
        pending = {int(r[0]) for r in db.execute("SELECT seq FROM outbox")}
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    finally:
        db.close()
    return pending, int(meta["next_seq"]), int(meta["dropped"])


def test_agent_enrolls_evaluates_and_survives_a_platform_outage(procs: Procs) -> None:
    secret = procs.cli("node", "enroll-token", "e2e-node", "--label", "zone=lab").strip()
    procs.agent("e2e-node", secret)

    def node() -> dict:
        try:
            return json.loads(procs.cli("node", "get", "e2e-node", "--json"))
        except AssertionError:
            return {}  # not enrolled yet

    wait(lambda: node().get("connected"), what="the agent's session")
    assert node()["identity"] == "node.e2e-node" and node()["labels"] == {"zone": "lab"}

    # Evaluate the built-in profile: every result the test can read itself matches.
    ev = json.loads(
        procs.cli("node", "evaluate", "e2e-node", "--baseline", "linux-hardening", "--json")
    )
    baseline = json.loads(procs.cli("node", "list", "--json"))
    assert [n["name"] for n in baseline] == ["nodes/e2e-node"]
    results = {r["control_id"]: r for r in ev["results"]}
    assert len(results) >= 30
    profile = json.loads(
        subprocess.run(
            [
                str(BIN / "python"),
                "-c",
                "import json;from google.protobuf import json_format;"
                "from autoecoops.platforms.machine_ops import convert, profile;"
                "print(json.dumps([json_format.MessageToDict(convert.control_to_pb(c), preserving_proto_field_name=True) for c in profile.builtin_controls()]))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    compared = 0
    for control in profile:
        expected = truth(control)
        if expected is None:
            continue
        got = results[control["id"]]
        assert (got.get("status"), got.get("observed", "")) == expected, control["id"]
        compared += 1
    assert compared >= 25

    inv = json.loads(
        procs.cli("node", "inventory", "e2e-node", "--refresh", "--table", "kernel_info", "--json")
    )
    assert inv["tables"][0]["rows"][0]["columns"]["version"] == os.uname().release
    listed = procs.cli("node", "list", "--filter", f"kernel.version = {os.uname().release}")
    assert "nodes/e2e-node" in listed

    # The platform goes away; the agent keeps evaluating into its outbox.
    procs.stop("machine-ops")
    outage_start = time.time()
    state = procs.tmp / "agent"
    _, before, _ = outbox(state)
    wait(lambda: outbox(state)[1] >= before + 4, 30, "evaluations while offline")
    outage_end = time.time()
    buffered_during, _, _ = outbox(state)
    assert buffered_during

    procs.serve("machine-ops")
    wait(lambda: node().get("connected"), what="the reconnect")
    wait(lambda: not (outbox(state)[0] & buffered_during), 60, "the buffered results to be acked")
    procs.stop("agent")
    pending, next_seq, dropped = outbox(state)
    assert dropped == 0

    out = list_evaluations(procs)
    evaluations = json.loads(out).get("evaluations", [])
    seqs = [int(e["name"].rsplit("-", 1)[1]) for e in evaluations]
    # Exactly once: no sequence stored twice, and every sequence the agent
    # produced is stored or still in its outbox. Buffered ones may already be stored when the agent
    # stopped before their ack arrived: the next session's Welcome names
    # the last applied sequence, so they are dropped, never applied again.
    assert len(seqs) == len(set(seqs))
    missing = set(range(1, next_seq)) - set(seqs) - pending
    # Not evaluations: the first inventory report, and the refreshed
    # inventory with its command result.
    assert len(missing) <= 3, missing
    procs.agent("e2e-node", "", evaluate_interval="3600")
    wait(lambda: not (outbox(state)[0] & pending), 60, "the last buffered results after a restart")
    procs.stop("agent")
    again = json.loads(list_evaluations(procs)).get("evaluations", [])
    seqs2 = [int(e["name"].rsplit("-", 1)[1]) for e in again]
    assert len(seqs2) == len(set(seqs2))
    assert set(seqs) <= set(seqs2)
    assert pending <= set(seqs2)
    during = [e for e in evaluations if outage_start <= _seconds(e["evaluate_time"]) <= outage_end]
    assert len(during) >= 3


def _seconds(ts: str) -> float:
    from google.protobuf import timestamp_pb2

    t = timestamp_pb2.Timestamp()
    t.FromJsonString(ts)
    return t.ToNanoseconds() / 1e9


def list_evaluations(procs: Procs) -> str:
    return subprocess.run(
        [
            str(BIN / "grpcurl"),
            "-plaintext",
            "-H",
            f"authorization: Bearer {local_token(procs)}",
            "-d",
            json.dumps({"parent": "nodes/e2e-node", "page_size": 1000}),
            f"127.0.0.1:{procs.env['AUTOECOOPS_MACHINE_OPS_PORT']}",
            "autoecoops.machineops.v1.MachineOpsService/ListEvaluations",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def local_token(procs: Procs) -> str:
    return subprocess.run(
        [str(BIN / "autoecoops"), "token", "--subject", "e2e", "--roles", "admin"],
        env=procs.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
