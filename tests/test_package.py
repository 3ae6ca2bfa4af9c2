"""The package as users install it: a wheel without tests, a console script, a cheap import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module",
    [
        "medplib",
        "medplib.core",
        "medplib.experts",
        "medplib.router",
        "medplib.agents",
        "medplib.trainers",
        "medplib.cli",
    ],
)
def test_import_does_not_load_torch(module: str) -> None:
    result = run_python(f"import sys, {module}; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_wheel_holds_the_package_without_tests(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("medplib-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "medplib/__init__.py",
        "medplib/cli.py",
        "medplib/core/errors.py",
        "medplib/core/io/raster.py",
        *(f"medplib/agents/ui/static/{name}" for name in ("index.html", "app.js", "app.css")),
    ):
        assert module in names
    assert not [name for name in names if name.startswith(("medplib/tests", "tests/"))]
    assert any(name.endswith("entry_points.txt") for name in names)
    # The package and its metadata, nothing else: no build script importable as `medplib.setup`.
    assert "medplib/setup.py" not in names
    assert not [name for name in names if not name.startswith(("medplib/", "medplib-"))]
