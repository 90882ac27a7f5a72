"""``autoecoops memory ingest`` and ``search`` against a running memory-hub."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from autoecoops.kernel.cli import main
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import StartMesh
from tests.unit.memory_hub.samples import make_pdf


@pytest.fixture
async def mesh(
    start_mesh: StartMesh, model_path: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Mesh:
    mesh = await start_mesh(["auth-service", "policy-audit", "memory-hub"], secure=True)
    # The CLI reads the same environment a user's shell would give it.
    monkeypatch.setenv("AUTOECOOPS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTOECOOPS_MEMORY_HUB_ADDR", mesh.config.addr("memory-hub"))
    monkeypatch.delenv("AUTOECOOPS_TOKEN", raising=False)
    return mesh


async def test_ingest_a_tree_then_search_it(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs / "runbooks").mkdir(parents=True)
    (docs / "runbooks" / "disk.md").write_text(
        "# Disk full\n\nPrune images with crictl rmi --prune.\n"
    )
    (docs / "tls.html").write_text("<h1>TLS</h1><p>cert-manager renews certificates.</p>")
    (docs / "etcd.pdf").write_bytes(make_pdf("Restore etcd with etcdctl snapshot restore."))
    (docs / "notes.txt").write_text("CoreDNS answers SERVFAIL when upstreams time out.")
    argv = [
        "memory",
        "ingest",
        str(docs),
        "-n",
        "ops",
        "--create",
        "--batch",
        "2",
        "--meta",
        "team=sre",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    assert "4 documents (0 unchanged)" in capsys.readouterr().out
    # Again: everything is recognised as unchanged.
    assert await asyncio.to_thread(main, argv) == 0
    assert "4 documents (4 unchanged)" in capsys.readouterr().out
    assert (
        await asyncio.to_thread(
            main, ["memory", "search", "restore etcd from a snapshot", "-n", "ops", "-k", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[2].startswith("etcd.pdf#0")
    argv = [
        "memory",
        "search",
        "pruning images",
        "-n",
        "ops",
        "--json",
        "--filter",
        '{"field":{"key":"team","eq":"sre"}}',
    ]
    assert await asyncio.to_thread(main, argv) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["results"][0]["chunk"]["document_id"] == "runbooks/disk.md"


async def test_errors_are_printed_with_their_details(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert await asyncio.to_thread(main, ["memory", "ingest", str(bad), "-n", "missing"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert (
        await asyncio.to_thread(main, ["memory", "ingest", str(bad), "-n", "ops", "--create"]) == 1
    )
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "documents[0].content: not valid UTF-8" in err
