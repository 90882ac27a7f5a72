"""Reports: SARIF 2.1.0 valid against the official schema, JUnit XML, JSON, the table, and
the CLI's Conftest exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import jsonschema
import pytest

from autoecoops.platforms.iaops import report
from autoecoops.platforms.iaops.validation import Report, Validator

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "iaops" / "sarif-schema-2.1.0.json").read_text()
)
BIN = Path(sys.executable).parent
BAD = """\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: shop}
spec:
  hostNetwork: true
  containers:
    - name: c
      image: nginx
"""
WARN_ONLY = """\
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: shop}
spec:
  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: c
      image: nginx:1.25
      resources: {requests: {memory: 1Gi}, limits: {memory: 1Gi}}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""


def validate_sarif(text: str) -> dict[str, object]:
    doc = json.loads(text)
    jsonschema.Draft4Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(doc)
    return doc  # type: ignore[no-any-return]


def bad_report() -> Report:
    return Validator().validate([("dir/pod one.yaml", BAD)])


def test_sarif_is_valid_against_the_official_schema_and_locates_each_result() -> None:
    r = bad_report()
    doc = validate_sarif(report.to_sarif(r))
    run = doc["runs"][0]  # type: ignore[index]
    results = run["results"]
    rules = run["tool"]["driver"]["rules"]
    assert len(results) == len(r.findings)
    first = results[0]
    assert rules[first["ruleIndex"]]["id"] == first["ruleId"]
    loc = first["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "dir/pod%20one.yaml"
    assert loc["region"]["startLine"] == r.findings[0].line
    assert first["level"] == "error"
    assert any(res["level"] == "warning" for res in results)  # LOW findings warn
    assert all("security-severity" in rule["properties"] for rule in rules)


def test_sarif_of_a_clean_run_and_of_a_parse_error_are_valid() -> None:
    validate_sarif(report.to_sarif(Report()))
    r = Validator().validate([("x.yaml", "a: [\n")])
    doc = validate_sarif(report.to_sarif(r))
    assert doc["runs"][0]["results"][0]["ruleId"] == "AEO-PARSE-001"  # type: ignore[index]


def test_sarif_validation_would_catch_a_broken_log() -> None:
    doc = json.loads(report.to_sarif(bad_report()))
    doc["runs"][0]["results"][0]["level"] = "fatal"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def test_junit_counts_failures_per_file() -> None:
    r = bad_report()
    root = ET.fromstring(report.to_junit(r))
    assert root.tag == "testsuites" and int(root.get("failures", "-1")) == r.failures
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "dir/pod one.yaml"
    cases = suite.findall("testcase")
    assert len(cases) == len(r.findings)
    assert sum(1 for c in cases if c.find("failure") is not None) == r.failures


def test_json_and_table() -> None:
    r = bad_report()
    doc = json.loads(report.to_json(r))
    assert doc["failure_count"] == r.failures and doc["findings"][0]["line"] > 0
    assert doc["findings"][0]["severity"] in ("CRITICAL", "HIGH")
    table = report.to_table(r)
    assert table.splitlines()[0].split() == ["SEVERITY", "RULE", "RESOURCE", "LOCATION", "MESSAGE"]
    assert "dir/pod one.yaml:5" in table  # hostNetwork's line
    assert table.splitlines()[-1].endswith(f"{r.failures} failures, {r.warnings} warnings")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "autoecoops"), "iac", "validate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_cli_exit_codes_are_conftests(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pod.yaml").write_text(BAD)
    (tmp_path / "warn.yaml").write_text(WARN_ONLY)
    failing = cli("bad", cwd=tmp_path)
    assert failing.returncode == 1 and "AEO-K8S-002" in failing.stdout
    warn = cli("warn.yaml", cwd=tmp_path)
    assert warn.returncode == 0 and "0 failures" in warn.stdout
    assert cli("warn.yaml", "--fail-on-warn", cwd=tmp_path).returncode == 1
    assert cli("bad", "--fail-on-warn", cwd=tmp_path).returncode == 2
    sarif = cli("bad", "-o", "sarif", "--output-file", "out.sarif", cwd=tmp_path)
    assert sarif.returncode == 1
    validate_sarif((tmp_path / "out.sarif").read_text())
    missing = cli("nope.yaml", cwd=tmp_path)
    assert missing.returncode == 1 and "nope.yaml" in missing.stderr
    assert cli(cwd=tmp_path).returncode == 1  # neither PATH nor --app
