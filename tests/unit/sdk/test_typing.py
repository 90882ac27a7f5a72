"""The sub-clients are statically typed through the generated stubs: mypy
infers the generated response types and rejects wrong requests, fields,
methods and services."""

from __future__ import annotations

import re
import textwrap
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

GOOD = """
    from typing import assert_type

    from autoecoops.auth.v1 import auth_pb2
    from autoecoops.events.v1 import events_pb2
    from autoecoops.machineops.v1 import machineops_pb2
    from autoecoops.memory.v1 import memory_pb2
    from autoecoops.policy.v1 import policy_pb2
    from autoecoops.sdk import AsyncClient, AsyncStream, CallInfo, Client, Retry, Stream
    from autoecoops.sdk.consumer import Consumer
    from autoecoops.sdk.events import BlockingConsumer


    def sync(client: Client) -> None:
        assert_type(client.memory.search(namespace="n", query="q", k=3), memory_pb2.SearchResponse)
        request = memory_pb2.SearchRequest(query="q")
        assert_type(client.memory.search(request, timeout=2.0), memory_pb2.SearchResponse)
        reply, call = client.auth.issue_token.with_call(client_id="a", client_secret="b")
        assert_type(reply, auth_pb2.IssueTokenResponse)
        assert_type(call, CallInfo)
        assert_type(
            client.events.subscribe(topic="t", group="g"), Stream[events_pb2.SubscribeResponse]
        )
        batches = [memory_pb2.StreamIngestDocumentsRequest(namespace="n")]
        assert_type(
            client.memory.stream_ingest_documents(batches),
            memory_pb2.StreamIngestDocumentsResponse,
        )
        client.memory.search(filter=None, mode=memory_pb2.SEARCH_MODE_HYBRID, retry=None)
        assert_type(client.events.consume("t", "g", print), BlockingConsumer)


    async def asynchronous(client: AsyncClient) -> None:
        reply = await client.memory.search(query="q", retry=Retry(max_attempts=2))
        assert_type(reply, memory_pb2.SearchResponse)
        stream = client.events.subscribe(topic="t", group="g")
        assert_type(stream, AsyncStream[events_pb2.SubscribeResponse])
        session = client.machineops.agent_session()
        assert_type(session, AsyncStream[machineops_pb2.AgentSessionResponse])
        assert_type(await client.policy.evaluate(), policy_pb2.EvaluateResponse)
        assert_type(client.events.consume("t", "g", print, concurrency=4), Consumer)
"""

BAD = """
    from autoecoops.memory.v1 import memory_pb2
    from autoecoops.sdk import Client


    def sync(client: Client) -> None:
        client.memory.search(k="three")  # E: arg-type
        client.memory.search(memory_pb2.GetNamespaceRequest())  # E: arg-type
        client.memory.search(bogus=1)  # E: call-arg
        client.memory.serch(query="q")  # E: attr-defined
        client.memroy.search(query="q")  # E: attr-defined
        client.memory.search(query="q", retry=3)  # E: arg-type
        client.events.subscribe(topic="t", retry=None)  # E: call-arg
        reply: memory_pb2.GetNamespaceResponse = client.memory.search()  # E: assignment
"""


@pytest.fixture(scope="module")
def mypy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package-dir mapping of pyproject.toml as links, as ./dev test builds it."""
    tree = tmp_path_factory.mktemp("typecheck")
    pkg = tree / "autoecoops"
    pkg.mkdir()
    for d in (ROOT / "gen/python/autoecoops").iterdir():
        (pkg / d.name).symlink_to(d)
    for name in ("kernel", "sdk"):
        (pkg / name).symlink_to(ROOT / name)
    return tree


def run_mypy(mypy_path: Path, source: str, tmp_path: Path) -> list[str]:
    api = pytest.importorskip("mypy.api")
    # A module name of its own: mypy's cache is shared by concurrent runs and
    # keyed by module name, and a stale "usage" entry would hide every error.
    name = f"sdk_typing_{uuid.uuid4().hex}"
    module = tmp_path / f"{name}.py"
    module.write_text(textwrap.dedent(source))
    cache = ROOT / ".build" / "mypy-sdk-typing"
    try:
        out, err, _ = api.run(
            [
                # The project's settings (strict, and its overrides for untyped packages).
                f"--config-file={ROOT / 'pyproject.toml'}",
                "--no-error-summary",
                "--show-error-codes",
                f"--cache-dir={cache}",
                str(module),
            ],
        )
    finally:
        for leftover in cache.glob(f"*/{name}.*"):
            leftover.unlink()
    assert not err, err
    return [
        line for line in out.splitlines() if line.startswith(str(module)) and ": error:" in line
    ]


@pytest.fixture
def mypy_env(mypy_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MYPYPATH", str(mypy_path))
    return mypy_path


def test_calls_have_the_generated_request_and_response_types(
    mypy_env: Path, tmp_path: Path
) -> None:
    assert run_mypy(mypy_env, GOOD, tmp_path) == []


def test_wrong_requests_fields_methods_and_services_are_type_errors(
    mypy_env: Path, tmp_path: Path
) -> None:
    errors = run_mypy(mypy_env, BAD, tmp_path)
    expected = {
        i + 1: m.group(1)
        for i, line in enumerate(textwrap.dedent(BAD).splitlines())
        if (m := re.search(r"# E: ([\w-]+)", line))
    }
    found: dict[int, set[str]] = {}
    for line in errors:
        m = re.match(r".*\.py:(\d+): error: .*\[([\w-]+)\]$", line)
        assert m, line
        found.setdefault(int(m.group(1)), set()).add(m.group(2))
    assert set(found) == set(expected), errors
    for line, code in expected.items():
        assert code in found[line], (line, errors)
