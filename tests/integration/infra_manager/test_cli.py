"""``autoecoops app ...`` against a running infra-manager, with the user's own credentials."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path

import pytest

from autoecoops.kernel.cli import main
from autoecoops.kernel.infra_manager.cli import colorize
from autoecoops.kernel.infra_manager.cluster import EmbeddedCluster
from autoecoops.kernel.infra_manager.model import Ref
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.mesh.server import Mesh
from tests.conftest import StartMesh, base_key
from tests.integration.infra_manager.conftest import configmap, deployment
from tests.integration.infra_manager.gitrepo import GitRepo


@pytest.fixture
async def mesh(start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_RECONCILE_SECONDS", "0")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_CLUSTER", "embedded")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_HEALTH_POLL_SECONDS", "0.02")
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR", str(tmp_path / "cache"))
    mesh = await start_mesh(
        ["auth-service", "policy-audit", "event-bus", "infra-manager"], secure=True
    )
    # The CLI reads the same environment a user's shell would give it.
    monkeypatch.setenv("AUTOECOOPS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTOECOOPS_INFRA_MANAGER_ADDR", mesh.config.addr("infra-manager"))
    monkeypatch.delenv("AUTOECOOPS_TOKEN", raising=False)
    return mesh


async def app_cli(*argv: str) -> int:
    code: int = await asyncio.to_thread(main, ["app", *argv])
    return code


async def test_list_get_sync_watch_diff_history_rollback_terminate(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import grpc

    from autoecoops.infra.v1 import infra_pb2 as pb
    from autoecoops.infra.v1 import infra_pb2_grpc
    from tests.conftest import MintToken

    repo = GitRepo(tmp_path / "repo")
    first = repo.commit({"deploy/app.yaml": deployment("web") + "---\n" + configmap("settings")})
    token = MintToken(tmp_path)("alice", ["admin"])
    stub = infra_pb2_grpc.InfraServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("infra-manager"))
    )
    await stub.CreateApplication(
        pb.CreateApplicationRequest(
            application=pb.Application(
                name="web",
                source=pb.ApplicationSource(
                    repo_url=repo.url, target_revision="main", path="deploy"
                ),
                destination=pb.ApplicationDestination(namespace="team-a"),
            )
        ),
        metadata=[("authorization", f"Bearer {token}")],
    )

    assert await app_cli("list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "NAME",
        "CLUSTER",
        "NAMESPACE",
        "PROJECT",
        "STATUS",
        "HEALTH",
        "SYNCPOLICY",
    ]
    assert out[1].split() == [
        "web",
        "in-cluster",
        "team-a",
        "default",
        "Unknown",
        "Unknown",
        "Manual",
    ]

    # sync --watch follows the operation to its end and lists what it applied.
    assert await app_cli("sync", "web", "--watch") == 0
    out = capsys.readouterr().out
    assert "Synced       ConfigMap team-a/settings" in out
    assert "Synced       apps/Deployment team-a/web" in out
    assert "Succeeded" in out and first[:12] in out

    assert await app_cli("get", "web", "--refresh") == 0
    out = capsys.readouterr().out
    assert "Sync Status:" in out and f"Synced to {first[:12]}" in out
    assert "Health Status:  Healthy" in out
    assert any(
        line.split()[:5] == ["apps", "Deployment", "team-a", "web", "Synced"]
        for line in out.splitlines()
    )

    # No drift: diff says nothing and exits 0; with drift, a coloured diff and exit 1.
    assert await app_cli("diff", "web") == 0
    assert capsys.readouterr().out == ""
    cluster = EmbeddedCluster(
        connect(mesh.config.redis_url),
        base_key(mesh.config.redis_url, mesh.config.key_prefix, "infra-manager") + ":cluster",
    )
    await cluster.update(
        Ref("apps", "v1", "Deployment", "team-a", "web"), lambda o: o["spec"].update(replicas=3)
    )
    assert await app_cli("diff", "web", "--color", "always") == 1
    out = capsys.readouterr().out
    assert "===== apps/Deployment team-a/web (OutOfSync) ======" in out
    assert "\033[31m-  replicas: 3\033[0m" in out and "\033[32m+  replicas: 1\033[0m" in out
    assert await app_cli("diff", "web", "--color", "never") == 1
    assert "\033[" not in capsys.readouterr().out

    second = repo.commit({"deploy/app.yaml": configmap("settings", {"v": "2"})})
    assert await app_cli("sync", "web", "--prune", "--watch") == 0
    out = capsys.readouterr().out
    assert "Pruned       apps/Deployment team-a/web" in out

    assert await app_cli("history", "web") == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["ID", "DATE", "REVISION", "INITIATED", "BY"]
    me = getpass.getuser()  # the local token is the current user's
    assert [(r[0], r[-2], r[-1]) for r in rows[1:]] == [("2", second, me), ("1", first, me)]

    assert await app_cli("rollback", "web", "1", "--watch") == 0
    assert "Rollback" in capsys.readouterr().out

    assert await app_cli("manifests", "web") == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n# deploy/app.yaml#0 (line 1)\napiVersion: v1\n")

    # Errors: the status, the reason and the field, on stderr; exit 2.
    assert await app_cli("terminate", "web") == 2
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "NO_OPERATION_RUNNING" in err
    assert await app_cli("get", "nope") == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert await app_cli("sync", "web", "--resource", "bad") == 2
    assert "--resource[0]" in capsys.readouterr().err
    assert await app_cli("get", "web", "--token", "not-a-token") == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_colorize_marks_removed_added_and_hunks() -> None:
    diff = "--- live/x\n+++ desired/x\n@@ -1 +1 @@\n-a: 1\n+a: 2\n b: 3\n"
    assert colorize(diff, False) == diff
    shown = colorize(diff, True)
    assert "\033[31m-a: 1\033[0m\n" in shown and "\033[32m+a: 2\033[0m\n" in shown
    assert "\033[36m@@ -1 +1 @@\033[0m\n" in shown and " b: 3\n" in shown
