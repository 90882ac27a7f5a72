"""A quiet first start: on a fresh data directory the first thing `autoecoops up`
prints is the service table, with no log lines before it."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.mesh.config import SERVICES
from tests.e2e.conftest import start_up, stop

pytestmark = pytest.mark.e2e


def test_the_first_lines_of_a_fresh_start_are_the_service_table(tmp_path: Path) -> None:
    mesh = start_up(tmp_path)
    try:
        first = [line.split()[0] for line in mesh.output[: len(SERVICES)]]
        assert first == [s.name for s in SERVICES], "".join(mesh.output)
    finally:
        assert stop(mesh) == 0
