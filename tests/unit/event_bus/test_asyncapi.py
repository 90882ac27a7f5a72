"""The generated AsyncAPI document: what it promises, and the real AsyncAPI parser's verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoecoops.kernel.event_bus.envelope import default_registry

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "gen" / "asyncapi" / "asyncapi.yaml"
TOOLS = ROOT / ".build" / "tools"
PARSER = "@asyncapi/parser"
PARSER_VERSION = "3.6.3"

#: Parses the document with @asyncapi/parser and prints what it understood.
VALIDATE_JS = """
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');
(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(process.argv[1], 'utf8'));
  const summary = document ? {
    channels: document.channels().all().map(c => [c.id(), c.address()]),
    operations: document.operations().all().map(o => [o.id(), o.action(), o.channels().all().map(c => c.id())]),
    messages: document.components().messages().all().map(m => m.id()),
  } : null;
  console.log(JSON.stringify({
    diagnostics: diagnostics.map(d => ({severity: d.severity, code: d.code, message: d.message, path: d.path})),
    summary,
  }));
})();
"""


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DOC.read_text())
    assert doc == json.loads(DOC.with_suffix(".json").read_text())
    return doc


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def test_every_topic_is_a_channel_on_its_stream_with_a_dead_letter_channel(
    document: dict[str, Any],
) -> None:
    reg = default_registry()
    channels = document["channels"]
    for topic in reg.topics:
        assert channels[topic]["address"] == f"autoecoops:events:{topic}"
        assert channels[f"{topic}.deadLetters"]["address"] == f"autoecoops:events:{topic}:dlq"
        names = {resolve(document, m["$ref"])["name"] for m in channels[topic]["messages"].values()}
        assert names == {t.type for t in reg.types_of(topic)}
    assert len(channels) == 2 * len(reg.topics)


def test_every_channel_has_send_and_receive_operations(document: dict[str, Any]) -> None:
    actions: dict[str, set[str]] = {}
    for op in document["operations"].values():
        channel = op["channel"]["$ref"].removeprefix("#/channels/")
        actions.setdefault(channel, set()).add(op["action"])
        for m in op["messages"]:
            assert m["$ref"].startswith(f"#/channels/{channel}/messages/")
    assert set(actions) == set(document["channels"])
    assert all(a == {"send", "receive"} for a in actions.values())


def test_messages_are_the_envelope_narrowed_to_their_type_and_payload(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    envelope = schemas["autoecoops.events.v1.Envelope"]
    assert {"idempotencyKey", "traceParent", "actor", "data"} <= envelope["properties"].keys()
    for t in default_registry().by_type.values():
        msg = document["components"]["messages"][t.type]
        props = msg["payload"]["properties"]
        assert props["type"] == {"const": t.type}
        packed = resolve(document, props["data"]["$ref"])
        assert packed["properties"]["@type"] == {"const": t.type_url}
        assert set(packed["properties"]) - {"@type"} == {f.json_name for f in t.descriptor.fields}
    # Descriptions come from the proto comments.
    sync = schemas["autoecoops.infra.v1.SyncStarted"]["properties"]["revision"]
    assert sync["description"] == "The Git commit being applied."
    assert all(resolve(document, r) is not None for r in refs(document))


def _parser_ready() -> Path:
    modules = TOOLS / "node_modules"
    installed = modules / "@asyncapi" / "parser" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == PARSER_VERSION:
        return modules
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"{PARSER} is missing and npm is not available to install it")
    done = subprocess.run(
        [
            npm,
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(TOOLS),
            f"{PARSER}@{PARSER_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"npm install {PARSER} failed: {done.stderr}"
    return modules


def parse(path: Path) -> dict[str, Any]:
    """What @asyncapi/parser makes of ``path``: its diagnostics and a summary."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the AsyncAPI parser (@asyncapi/parser) runs on it")
    done = subprocess.run(
        [node, "-e", VALIDATE_JS, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NODE_PATH": str(_parser_ready())},
    )
    assert done.returncode == 0, done.stderr
    verdict: dict[str, Any] = json.loads(done.stdout)
    return verdict


def test_the_asyncapi_parser_accepts_the_document() -> None:
    verdict = parse(DOC)
    # Severity 0 is an error, 1 a warning; 2 and 3 are hints (e.g. "3.1.0 exists").
    problems = [d for d in verdict["diagnostics"] if d["severity"] <= 1]
    assert problems == []
    summary = verdict["summary"]
    topics = default_registry().topics
    assert sorted(summary["channels"]) == sorted(
        [[t, f"autoecoops:events:{t}"] for t in topics]
        + [[f"{t}.deadLetters", f"autoecoops:events:{t}:dlq"] for t in topics]
    )
    assert len(summary["operations"]) == 4 * len(topics)
    assert {a for _, a, _ in summary["operations"]} == {"send", "receive"}
    assert len(summary["messages"]) == len(default_registry().by_type) + 1


def test_a_broken_document_is_rejected_by_the_parser(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    # The check above can fail: a dangling channel reference is an error.
    broken = json.loads(json.dumps(document))
    next(iter(broken["operations"].values()))["channel"] = {"$ref": "#/channels/no.such.topic"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert any(d["severity"] == 0 for d in parse(path)["diagnostics"])
