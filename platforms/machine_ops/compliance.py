"""Scores, drift and the wg-policy PolicyReport export of evaluation results."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from autoecoops.platforms.machine_ops.model import ERROR, FAIL, PASS, SEVERITY_ORDER, SKIP, Result


@dataclass(frozen=True, slots=True)
class DriftItem:
    """A control whose status changed since the previous evaluation."""

    baseline: str
    control_id: str
    previous_status: str
    status: str
    previous_observed: str
    observed: str


def counts(results: Iterable[Result]) -> dict[str, int]:
    """Results by status."""
    out = {PASS: 0, FAIL: 0, ERROR: 0, SKIP: 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def score(results: Sequence[Result]) -> float:
    """Passed / (passed + failed) as a percentage; skipped and errored do not count.

    No evaluable control at all scores 100: nothing observed failed.
    """
    c = counts(results)
    judged = c[PASS] + c[FAIL]
    return round(100.0 * c[PASS] / judged, 2) if judged else 100.0


def drift(previous: Sequence[Result], current: Sequence[Result]) -> list[DriftItem]:
    """Controls present in both whose status changed (new or dropped controls are not drift)."""
    before = {(r.baseline, r.control_id): r for r in previous}
    out = []
    for r in current:
        p = before.get((r.baseline, r.control_id))
        if p is not None and p.status != r.status:
            out.append(
                DriftItem(r.baseline, r.control_id, p.status, r.status, p.observed, r.observed)
            )
    return out


def max_severity(results: Iterable[Result]) -> str:
    """The highest severity among ``results`` ("info" for none)."""
    return max((r.severity for r in results), key=SEVERITY_ORDER.index, default="info")


#: wg-policy's result values for ours.
_PR_RESULT = {PASS: "pass", FAIL: "fail", ERROR: "error", SKIP: "skip"}


def policy_report(
    node: str, results: Sequence[Result], evaluate_time: float | None = None
) -> dict[str, Any]:
    """A PolicyReport (wgpolicyk8s.io/v1alpha2) of a node's latest results.

    The scope is the node; each result names its baseline as the policy and
    the control as the rule, with the severity, the observed value and the
    CIS/dev-sec tags' source in properties.
    """
    ts = evaluate_time if evaluate_time is not None else time.time()
    c = counts(results)
    node_id = node.split("/", 1)[-1]
    return {
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "PolicyReport",
        "metadata": {
            "name": f"machineops-{node_id}",
            "labels": {"app.kubernetes.io/managed-by": "autoecoops-machineops"},
        },
        "scope": {"apiVersion": "v1", "kind": "Node", "name": node_id},
        "summary": {
            "pass": c[PASS],
            "fail": c[FAIL],
            "warn": 0,
            "error": c[ERROR],
            "skip": c[SKIP],
        },
        "results": [
            {
                "source": "autoecoops-machineops",
                "policy": r.baseline,
                "rule": r.control_id,
                "result": _PR_RESULT[r.status],
                "severity": r.severity if r.severity != "info" else "info",
                "scored": r.status in (PASS, FAIL),
                "message": r.message or r.title,
                "timestamp": {"seconds": int(ts), "nanos": 0},
                "properties": {
                    "title": r.title,
                    "expected": r.expected,
                    "observed": r.observed,
                    "baselineVersion": str(r.baseline_version),
                },
            }
            for r in results
        ],
    }
