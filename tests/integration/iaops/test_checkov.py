"""Agreement with Checkov on a fixed corpus: this repository's rendered chart and manifests
with known faults. Checkov runs for real, offline, from its own venv (./dev test installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.iaops.checkov_corpus import CHECKOV, MAPPING, compare, write_corpus

#: The disagreements docs/iaops.md explains; any other one fails this test.
EXPECTED = {
    # Checkov's CKV_K8S_39 looks for SYS_ADMIN only; Pod Security baseline refuses
    # every capability outside its default set, NET_ADMIN included.
    ("StatefulSet.faults.netadmin", "CKV_K8S_39", True),
}


def test_iaops_agrees_with_checkov_on_the_checks_both_have(tmp_path: Path) -> None:
    if not CHECKOV.exists():
        pytest.skip(
            "checkov is not installed; ./dev test installs it into .build/tools/checkov-venv"
        )
    agreement = compare(write_corpus(tmp_path / "corpus"))
    assert set(agreement.disagreements) == EXPECTED
    assert set(agreement.per_check) == set(MAPPING)  # every mapped check was compared
    assert agreement.both_fail >= 30 and agreement.both_pass >= 200
    assert agreement.rate > 0.99
