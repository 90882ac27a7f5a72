"""The policy engine, the shipped policies' own tests (run in CI), and decision-log masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import InvalidArgument
from autoecoops.kernel.policy_audit.bundles import BundleSpec, compile_spec, load_dir, validate
from autoecoops.kernel.policy_audit.config import SHIPPED_POLICIES
from autoecoops.kernel.policy_audit.decisions import DecisionRecord, mask
from autoecoops.kernel.policy_audit.engine import (
    CompiledBundle,
    CompileError,
    Decision,
    run_cases,
)

SHIPPED = load_dir(SHIPPED_POLICIES, "platform", source="shipped:")
TESTS = {
    p.relative_to(SHIPPED_POLICIES).as_posix(): p.read_text()
    for p in sorted(SHIPPED_POLICIES.rglob("*_test.rego"))
}
CASES = run_cases(dict(SHIPPED.modules), SHIPPED.data, TESTS)


def test_the_shipped_policies_have_tests() -> None:
    assert len(CASES) >= 10
    assert {c.module for c in CASES} == set(TESTS)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.module}:{c.name}" for c in CASES])
def test_shipped_policy_case(case: object) -> None:
    assert case.passed, case.detail  # type: ignore[attr-defined]


def test_a_failing_case_is_reported_as_failing() -> None:
    table = {
        "t_test.rego": 'package t_test\n\ncases := [{"name": "wrong", "query": "autoecoops/deploy/allow", "input": {}, "want": true}]\n'
    }
    [result] = run_cases(dict(SHIPPED.modules), SHIPPED.data, table)
    assert not result.passed and result.detail == "got false"


def test_a_module_that_does_not_compile_names_file_line_and_column() -> None:
    with pytest.raises(CompileError) as info:
        CompiledBundle({"x/bad.rego": "package x\n\nallow if { input.x == }\n"}, {})
    assert info.value.errors == [("x/bad.rego", 3, 20, "Invalid boolean operator")]
    spec = BundleSpec(name="b", modules=(("x/bad.rego", "package x\n\nallow if { input.x == }\n"),))
    with pytest.raises(InvalidArgument) as err:
        compile_spec(spec)
    assert err.value.reason == "POLICY_COMPILE_ERROR"
    assert err.value.field_violations[0].field == "bundle.modules[0].source"
    assert "x/bad.rego:3:20: Invalid boolean operator" in err.value.message


def test_bundle_validation_names_each_bad_field() -> None:
    spec = BundleSpec(
        name="Bad Name",
        roots=("a", "a/b"),
        modules=(("p.rego", "package elsewhere\nallow := true\n"), ("q.txt", "package a\n")),
        masks=("/credentials", "input/x"),
    )
    with pytest.raises(InvalidArgument) as info:
        validate(spec)
    fields = {v.field for v in info.value.field_violations}
    assert fields == {
        "bundle.name",
        "bundle.roots[0]",
        "bundle.modules[0].source",
        "bundle.modules[1].path",
        "bundle.masks[0]",
        "bundle.masks[1]",
    }


def test_with_is_refused_because_the_engine_crashes_on_it() -> None:
    spec = BundleSpec(
        name="w", modules=(("w.rego", "package w\n\nx if data.w.y with input as {}\n"),)
    )
    with pytest.raises(InvalidArgument, match="with input"):
        validate(spec)


def test_evaluate_entrypoints_and_deeper_paths() -> None:
    compiled = compile_spec(SHIPPED)
    allow = compiled.evaluate(
        "autoecoops/deploy/allow",
        {"identity": {"sub": "a", "roles": ["developer"], "groups": ["team-web"]},
         "target": {"environment": "staging", "namespace": "web"}},
    )  # fmt: skip
    assert allow == Decision(True, True)
    assert compiled.evaluate("autoecoops/deploy/environments/2", {}) == Decision(True, "production")
    assert compiled.evaluate("autoecoops/deploy/nope", {}) == Decision(False)


def test_revision_changes_exactly_when_content_does() -> None:
    again = load_dir(SHIPPED_POLICIES, "platform", source="shipped:")
    assert again.content_revision() == SHIPPED.content_revision()
    assert SHIPPED.content_revision().startswith("sha256:")
    import dataclasses

    described = dataclasses.replace(SHIPPED, description="other words")
    assert described.content_revision() == SHIPPED.content_revision()
    masked = dataclasses.replace(SHIPPED, masks=(*SHIPPED.masks, "/input/x"))
    assert masked.content_revision() != SHIPPED.content_revision()


def test_masks_remove_json_pointers_and_report_them() -> None:
    doc = {
        "input": {
            "credentials": {"token": "s3cret"},
            "a/b": 1,
            "list": [{"k": 1}, {"k": 2}],
            "keep": 1,
        },
        "result": {"allow": True, "secret": "x"},
    }
    erased = mask(
        doc,
        ["/input/credentials", "/input/a~1b", "/input/list/1", "/result/secret", "/input/absent"],
    )
    assert erased == ["/input/credentials", "/input/a~1b", "/input/list/1", "/result/secret"]
    assert doc == {"input": {"list": [{"k": 1}], "keep": 1}, "result": {"allow": True}}


def test_decision_entry_masks_a_copy_and_records_the_caller() -> None:
    inp = {"credentials": "pw", "target": {"environment": "prod"}}
    rec = DecisionRecord(
        "d1", "autoecoops/deploy/decision", "platform", "sha256:ab", ("/input/credentials", "/result/reasons"),
        inp, Decision(True, {"allow": False, "reasons": ["r"]}),
        Principal("alice", issuer="https://issuer", actors=("iaops",)), "0" * 32,
    )  # fmt: skip
    entry = rec.entry()
    assert inp["credentials"] == "pw"  # the caller's document is untouched
    details = dict(entry.details)
    assert "credentials" not in details["input"]
    assert dict(details["result"]) == {"allow": False}
    assert list(details["erased"]) == ["/input/credentials", "/result/reasons"]
    assert details["allowed"] is False and details["bundle_revision"] == "sha256:ab"
    assert entry.actor.subject == "alice" and list(entry.actor.actors) == ["iaops"]
    assert entry.decision_id == "d1" and entry.type == "policy.decision"


def test_shipped_controls_catalogue_loads(tmp_path: Path) -> None:
    from autoecoops.kernel.mesh.errors import ConfigError
    from autoecoops.kernel.policy_audit.compliance import load_catalogue
    from autoecoops.kernel.policy_audit.config import SHIPPED_CONTROLS

    controls = load_catalogue(SHIPPED_CONTROLS)
    assert {fw for c in controls for fw in c.mappings} == {"SOC2", "CIS", "NIST-800-53"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "controls:\n  - id: x\n    evidence: {kind: rego, rule: a/b, policy: 'package a\n\nb if {'}\n"
    )
    with pytest.raises(ConfigError, match="does not compile"):
        load_catalogue(bad)
