"""The whole mesh as a user runs it: `autoecoops up` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import SERVICES
from tests.conftest import free_port

BIN = Path(sys.executable).parent


@dataclass
class RunningMesh:
    """A running `autoecoops up` and where its services listen."""

    proc: subprocess.Popen[str]
    addrs: dict[str, str]
    output: list[str]
    env: dict[str, str]

    def cli(self, *args: str) -> str:
        """Run another `autoecoops` command against this mesh's configuration."""
        done = subprocess.run(
            [str(BIN / "autoecoops"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode:
            raise AssertionError(f"autoecoops {args} failed: {done.stderr}")
        return done.stdout

    def grpcurl(
        self,
        service: str,
        *words: str,
        data: object = None,
        raw_data: str | None = None,
        flags: tuple[str, ...] = (),
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real grpcurl binary: ``grpcurl -plaintext [flags] ADDR words...``."""
        cmd = [str(BIN / "grpcurl"), "-plaintext", "-max-time", "10", *flags]
        if data is not None or raw_data is not None:
            cmd += ["-d", raw_data if raw_data is not None else json.dumps(data)]
        cmd += [self.addrs[service], *words]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and done.returncode:
            raise AssertionError(f"grpcurl {words} failed: {done.stdout}{done.stderr}")
        return done


def clean_env() -> dict[str, str]:
    """This process's environment without the mesh's own settings (ports, Redis,
    OpenTelemetry), so a test's processes use only what the test sets."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AUTOECOOPS_", "OTEL_")) and k != "REDIS_URL"
    }


def serve(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """``autoecoops serve <name>`` with ``env``, its output in ``log``."""
    return subprocess.Popen(
        [str(BIN / "autoecoops"), "serve", name],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_serving(log: Path, proc: subprocess.Popen[str], within: float = 90) -> None:
    """Wait until the served process logs ``SERVING in``; its log if it dies or times out."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if "SERVING in" in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{log.name} did not start:\n{log.read_text()}")


def start_up(tmp_path: Path, extra_env: dict[str, str] | None = None) -> RunningMesh:
    """Start `autoecoops up` on free ports and wait until it reports all SERVING."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AUTOECOOPS_") and k != "REDIS_URL"
    }
    addrs = {}
    for svc in SERVICES:
        port = free_port()
        env[f"AUTOECOOPS_{svc.env}_PORT"] = str(port)
        addrs[svc.name] = f"127.0.0.1:{port}"
    env["AUTOECOOPS_DATA_DIR"] = str(tmp_path / "data")
    # The gateway too, so a developer's own `./dev up` on 8080 is left alone.
    env["AUTOECOOPS_GATEWAY_PORT"] = str(free_port())
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [str(BIN / "autoecoops"), "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if "services SERVING" in line:
            return RunningMesh(proc, addrs, output, env)
    proc.kill()
    raise AssertionError("autoecoops up did not report SERVING:\n" + "".join(output))


def stop(mesh: RunningMesh, sig: int = signal.SIGTERM) -> int:
    """Signal the mesh and return its exit code."""
    mesh.proc.send_signal(sig)
    try:
        out, _ = mesh.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        mesh.proc.kill()
        raise
    mesh.output.append(out)
    return mesh.proc.returncode


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    """One `autoecoops up` shared by a module's tests."""
    running = start_up(tmp_path_factory.mktemp("mesh"))
    yield running
    if running.proc.poll() is None:
        stop(running)
