"""The web console in a real browser against the real mesh.

`autoecoops up` runs on free ports (with the shared Redis under a key prefix of
its own, so the test can tamper with the audit log the way an attacker with
Redis access would); the test creates data through the REST gateway, then
tests/e2e/console_browser.mjs drives Debian's headless Chromium with
playwright-core through every page: the data shows, an entry's proof verifies
in the browser and a tampered one fails, redrive and sync work, a read-only
token gets disabled buttons, no request leaves the gateway, no CSP
violation, no serious or critical axe-core finding. Screenshots go to
.build/screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.conftest import RunningMesh, start_up, stop
from tests.integration.infra_manager.gitrepo import GitRepo

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "gateway" / "console"
DRIVER = Path(__file__).with_name("console_browser.mjs")
SCREENSHOTS = ROOT / ".build" / "screenshots"
CHROMIUM = os.environ.get("AUTOECOOPS_CHROMIUM", "/usr/bin/chromium")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _browser_missing() -> str:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (./dev test installs Debian's chromium)"
    if shutil.which("node") is None:
        return "no node"
    for pkg in ("playwright-core", "@axe-core/playwright"):
        if not (CONSOLE / "node_modules" / pkg).is_dir():
            return f"no {pkg} in gateway/console/node_modules (./dev test runs npm ci there)"
    return ""


@pytest.fixture(scope="module", autouse=True)
def browser_tools() -> None:
    """./dev test installs the browser and sets AUTOECOOPS_REQUIRE_BROWSER: there, never skip."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("AUTOECOOPS_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


@dataclass
class Console:
    """The running mesh, its gateway and what the test created in it."""

    mesh: RunningMesh
    base: str
    admin: str
    viewer: str
    prefix: str
    redis: redis.Redis
    spec: dict[str, Any]

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            headers={"authorization": f"Bearer {token or self.admin}"},
            timeout=30,
        )


def _ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def _audit(http: httpx.Client) -> tuple[int, int]:
    """Two entries of one trace: one stays intact, one gets tampered with."""
    indexes = []
    for resource in ("iaops/deployments/web-1", "iaops/deployments/web-2"):
        body = {
            "requestId": str(uuid.uuid4()),
            "entry": {
                "type": "console.test",
                "service": "iaops",
                "actor": {"subject": "carol"},
                "action": "deployments.create",
                "resource": resource,
                "outcome": "OUTCOME_SUCCESS",
                "traceId": TRACE,
            },
        }
        indexes.append(int(_ok(http.post("/v1/audit/entries", json=body))["index"]))
    return indexes[0], indexes[1]


def _tamper(client: redis.Redis, prefix: str, index: int) -> None:
    """Change entry ``index``'s stored bytes in place, ids unchanged (as test_verify does).

    One WATCH/MULTI transaction: the mesh keeps appending its own audit
    entries, and a rewrite must not lose or reorder one of them.
    """
    key = f"{prefix}policy-audit:{{audit}}:entries"

    def rewrite(pipe: redis.client.Pipeline) -> None:
        entries = [(i, f[b"e"]) for i, f in pipe.xrange(key)]
        pipe.multi()
        pipe.delete(key)
        for sid, data in entries:
            if sid == f"{index}-1".encode():
                doc = json.loads(data)
                doc["outcome"] = "OUTCOME_DENIED"
                data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            pipe.xadd(key, {"e": data}, id=sid)

    client.transaction(rewrite, key)


def _dead_letter(http: httpx.Client, topic: str, group: str) -> str:
    """Publish one event, take it as ``group`` and dead-letter it with a reason."""
    event = {
        "envelope": {
            "source": "//console-test",
            "type": "autoecoops.audit.entry.appended",
            "idempotencyKey": str(uuid.uuid4()),
            "data": {
                "@type": "type.googleapis.com/autoecoops.audit.v1.EntryAppended",
                "index": "7",
                "type": "console.test",
            },
        }
    }
    _ok(http.post(f"/v1/events/topics/{topic}:publish", json=event))
    sub = {"consumer": "c1", "startPosition": "START_POSITION_EARLIEST"}
    url = f"/v1/events/topics/{topic}/groups/{group}:subscribe"
    with http.stream("POST", url, json=sub, timeout=30) as r:
        assert r.status_code == 200, r.read()
        line = next(r.iter_lines())
    delivery = json.loads(line)["result"]["delivery"]
    nack = {"reason": "schema mismatch: field x", "deadLetter": True}
    _ok(http.post(f"/v1/events/deliveries/{delivery['deliveryId']}:nack", json=nack))
    letters = _ok(http.get(f"/v1/events/topics/{topic}/deadLetters"))["deadLetters"]
    assert len(letters) == 1
    return str(letters[0]["deadLetterId"])


def _application(http: httpx.Client, repo: GitRepo) -> None:
    repo.commit({"deploy/app.yaml": _configmap("v1")})
    app = {
        "name": "shop",
        "source": {"repoUrl": repo.url, "targetRevision": "main", "path": "deploy"},
        "destination": {"namespace": "team-a"},
    }
    _ok(http.post("/v1/applications", json=app))
    _ok(http.post("/v1/applications/shop:sync", json={}))
    _wait_synced(http, "shop")
    # A new commit: the console shows the app out of sync and the change as a diff.
    repo.commit({"deploy/app.yaml": _configmap("v2")})
    _ok(http.post("/v1/applications/shop:refresh", json={}))


def _configmap(version: str) -> str:
    return (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop-settings\n"
        f'data:\n  version: "{version}"\n  colour: blue\n'
    )


def _wait_synced(http: httpx.Client, name: str) -> dict[str, Any]:
    for _ in range(200):
        app: dict[str, Any] = _ok(http.get(f"/v1/applications/{name}"))["application"]
        op = app.get("status", {}).get("operationState", {})
        if op.get("phase") not in (None, "OPERATION_PHASE_RUNNING"):
            return app
        time.sleep(0.05)
    raise AssertionError(f"{name}: the sync did not finish")


def _memory(http: httpx.Client) -> None:
    _ok(http.post("/v1/memory/namespaces", json={"name": "runbooks"}))
    docs = {
        "documents": [
            {
                "id": "disk-full",
                "title": "Disk full on a node",
                "sourceUri": "https://wiki.example/runbooks/disk-full",
                "text": "When a node's disk is full, rotate the logs and prune old images.",
            },
            {
                "id": "cert-expiry",
                "title": "Certificate expiry",
                "sourceUri": "https://wiki.example/runbooks/certs",
                "text": "Renew TLS certificates thirty days before they expire.",
            },
        ]
    }
    _ok(http.post("/v1/memory/namespaces/runbooks/documents:ingest", json=docs))


@pytest.fixture(scope="module")
def console(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    prefix = f"autoecoops-test:{uuid.uuid4().hex[:10]}:"
    env = {
        "REDIS_URL": redis_url,
        "AUTOECOOPS_KEY_PREFIX": prefix,
        "AUTOECOOPS_INFRA_MANAGER_REPO_CACHE_DIR": str(tmp / "repo-cache"),
    }
    mesh = start_up(tmp, env)
    client = redis.Redis.from_url(redis_url)
    try:
        base = f"http://127.0.0.1:{mesh.env['AUTOECOOPS_GATEWAY_PORT']}"
        admin = mesh.cli("token", "--subject", "root", "--roles", "admin").strip()
        viewer = mesh.cli("token", "--subject", "vera", "--roles", "viewer").strip()
        with httpx.Client(
            base_url=base, headers={"authorization": f"Bearer {admin}"}, timeout=30
        ) as http:
            good, tampered = _audit(http)
            dead_letter = _dead_letter(http, "audit.entries", "billing")
            _application(http, GitRepo(tmp / "repo"))
            _memory(http)
        _tamper(client, prefix, tampered)
        spec = {
            "traceId": TRACE,
            "goodIndex": good,
            "tamperedIndex": tampered,
            "topic": "audit.entries",
            "group": "billing",
            "deadLetterId": dead_letter,
            "app": "shop",
            "namespace": "runbooks",
            "query": "disk is full",
            "expectedSource": "https://wiki.example/runbooks/disk-full",
        }
        yield Console(mesh, base, admin, viewer, prefix, client, spec)
    finally:
        if mesh.proc.poll() is None:
            stop(mesh)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


def test_every_page_in_a_real_browser(console: Console) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CONSOLE_BASE": console.base,
        "CONSOLE_ADMIN_TOKEN": console.admin,
        "CONSOLE_VIEWER_TOKEN": console.viewer,
        "CONSOLE_SPEC": json.dumps(console.spec),
        "CONSOLE_SCREENSHOTS": str(SCREENSHOTS),
        "CONSOLE_CHROMIUM": CHROMIUM,
        "CONSOLE_MODULES": str(CONSOLE),
    }
    done = subprocess.run(
        ["node", str(DRIVER)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"browser run failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])

    # The proof verdicts were computed in the page, and they are the right ones.
    assert report["verdicts"] == {"good": "verified", "tampered": "failed"}
    # Nothing left the gateway: no CDN, no third-party request.
    assert report["offsite"] == []
    assert report["cspViolations"] == []
    for page, findings in report["axe"].items():
        assert findings == [], f"{page}: serious or critical accessibility findings {findings}"
    for name in ("signin", "audit", "audit-failed", "events", "gitops", "memory", "docs"):
        shot = SCREENSHOTS / f"{name}.png"
        assert shot.is_file() and shot.stat().st_size > 5000, shot

    # The buttons did what they said, as the server sees it.
    with console.http() as http:
        spec = console.spec
        letters = _ok(http.get(f"/v1/events/topics/{spec['topic']}/deadLetters"))
        assert letters.get("deadLetters", []) == []
        stats = _ok(http.get(f"/v1/events/topics/{spec['topic']}/stats"))["stats"]
        assert int(stats.get("deadLetterCount", 0)) == 0
        app = _wait_synced(http, "shop")
        assert app["status"]["sync"]["status"] == "SYNC_STATUS_CODE_SYNCED"
        history = _ok(http.get("/v1/applications/shop/history"))["entries"]
        assert len(history) == 2  # the fixture's sync and the button's


def test_the_console_is_served_with_a_strict_policy(console: Console) -> None:
    with httpx.Client(base_url=console.base, timeout=10) as http:
        for path in ("/console", "/console/", "/docs"):
            r = http.get(path)
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
            assert "http://" not in r.text and "https://" not in r.text
        # The tampered entry really is changed in what the gateway serves.
        body = http.get(
            f"/v1/audit/entries/{console.spec['tamperedIndex']}",
            headers={"authorization": f"Bearer {console.admin}"},
        ).json()
        assert b"OUTCOME_DENIED" in base64.b64decode(body["entryBytes"])
