"""A quiet first start: the package metadata builds without deprecation
warnings, and ./dev's installer prints one progress line per step."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_license_is_an_spdx_expression() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    # PEP 639 license expressions need setuptools 77 or later to build.
    assert any(r.startswith("setuptools>=") for r in meta["build-system"]["requires"])
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(req.split(">=")[1].split(".")[0]) >= 77


def test_building_the_package_prints_no_deprecation(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "deprecated" not in out.lower(), [
        line for line in out.splitlines() if "deprecat" in line.lower()
    ]


def test_the_installer_prints_one_line_per_step_and_hides_pip_noise(tmp_path: Path) -> None:
    # ./dev's own step function, with a command as noisy as pip on a machine
    # whose pip.conf names index paths that do not exist.
    noisy = (
        "import sys\n"
        "for i in range(50):\n"
        "    print(\"WARNING: Location 'file:///opt/pypi/simple/x/' is ignored: it is neither "
        'a file nor a directory.", file=sys.stderr)\n'
        "print('  BuildBackendWarning: Editable installation.')\n"
    )
    script = (
        'source <(sed -n "/^step()/,/^}/p" dev)\n'
        f'step "{tmp_path}/install.log" "installing" "{sys.executable}" -c "$NOISY"\n'
        f'step "{tmp_path}/install.log" "second step" true\n'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={"NOISY": noisy, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["dev: installing ... done", "dev: second step ... done"]
    assert done.stderr == ""
    assert "is ignored" in (tmp_path / "install.log").read_text()
    failed = subprocess.run(
        [
            "bash",
            "-c",
            'source <(sed -n "/^step()/,/^}/p" dev)\n'
            f'step "{tmp_path}/f.log" "failing" "{sys.executable}" -c "$FAILING"',
        ],
        cwd=ROOT,
        env={"FAILING": noisy + "raise SystemExit(3)\n", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout
    assert "is ignored" not in failed.stderr and "Editable installation" in failed.stderr
