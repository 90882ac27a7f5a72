"""sdk/README.md's examples run, in order, against real services."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import BY_NAME
from tests.conftest import StartMesh

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ["auth-service", "policy-audit", "memory-hub", "event-bus"]


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "sdk" / "README.md").read_text(), re.S)


async def test_the_usage_page_examples_run(
    start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh = await start_mesh(SERVICES, secure=True)
    # What a reader's shell has after `./dev up`: the mesh's addresses and data dir.
    for name in SERVICES:
        monkeypatch.setenv(f"AUTOECOOPS_{BY_NAME[name].env}_PORT", str(mesh.config.port(name)))
    monkeypatch.setenv("AUTOECOOPS_DATA_DIR", str(mesh.config.data_dir))
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": "readme"}

    def run() -> None:
        for i, block in enumerate(blocks()):
            exec(compile(block, f"sdk/README.md block {i}", "exec"), namespace)

    await asyncio.to_thread(run)
    assert len(blocks()) >= 10
