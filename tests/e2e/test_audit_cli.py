"""`autoecoops audit` against the default install: no REDIS_URL, the embedded
Redis of the data directory found by the CLI itself, while the mesh runs and
after it stopped; and `audit verify --api` through the running mesh."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_up, stop

pytestmark = pytest.mark.e2e


def test_audit_commands_find_the_embedded_redis_running_or_not(tmp_path: Path) -> None:
    mesh = start_up(tmp_path)
    try:
        assert "REDIS_URL" not in mesh.env
        data = Path(mesh.env["AUTOECOOPS_DATA_DIR"])
        token = mesh.cli("token", "--subject", "alice", "--roles", "admin").strip()
        base = f"http://127.0.0.1:{mesh.env['AUTOECOOPS_GATEWAY_PORT']}"
        # Audited calls: each writes an entry to the log.
        for n in range(3):
            r = httpx.post(
                f"{base}/v1/roles",
                json={"name": f"e2e-{n}", "permissions": ["memory.*"]},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        note = tmp_path / "cp.note"
        out = mesh.cli("audit", "checkpoint", "-o", str(note))
        assert "saved the checkpoint of size" in out
        key = str(data / "policy-audit" / "checkpoint.key.pub")
        out = mesh.cli("audit", "verify", "--checkpoint", str(note), "--key", key)
        assert out.startswith("OK: entries 0..") or "\nOK: entries 0.." in out, out
        # Through the API: the CLI dials policy-audit and mints a viewer token itself.
        out = mesh.cli("audit", "verify", "--api", "--key", key, "--checkpoint", str(note))
        assert "consistent with the kept checkpoint" in out and "OK: entries 0.." in out, out
    finally:
        assert stop(mesh) == 0
    # Stopped: the CLI starts the data directory's Redis for as long as it needs it.
    out = mesh.cli("audit", "verify", "--checkpoint", str(note), "--key", key)
    assert "OK: entries 0.." in out, out
    assert not (data / "redis.url").exists()
