"""The package as users install it: a wheel without tests, a console script, a cheap import."""

from __future__ import annotations

import re
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
        "medplib/cli/__init__.py",
        "medplib/core/errors.py",
        "medplib/core/io/raster.py",
        *(f"medplib/agents/serve/ui/static/{name}" for name in ("index.html", "app.js", "app.css")),
        "medplib/core/model/tiny_tokenizer.json",
    ):
        assert module in names
    assert not [name for name in names if name.startswith(("medplib/tests", "tests/"))]
    assert any(name.endswith("entry_points.txt") for name in names)
    # The package and its metadata, nothing else: no build script importable as `medplib.setup`.
    assert "medplib/setup.py" not in names
    assert not [name for name in names if not name.startswith(("medplib/", "medplib-"))]


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A module the package imports (outside tests and benchmarks) comes from a distribution that
    pyproject.toml declares, in the base dependencies or an extra: else a fresh install breaks.
    Examples are packages of their own; a dependency's dependencies do not count."""
    import ast
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        *project["dependencies"],
        *(d for extra in project["optional-dependencies"].values() for d in extra),
    ]
    declared = {canonical(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]) for spec in wanted}
    distributions = packages_distributions()
    undeclared = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in SKIPPED or relative.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "medplib" or top in sys.stdlib_module_names:
                    continue
                owners = {canonical(d) for d in distributions.get(top, [top])}
                if not owners & declared:
                    undeclared.setdefault(top, str(relative))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


# Not the installed package: its tests and benchmarks, example plugins (packages of their own), the build.
SKIPPED = ("tests", "benchmarks", "examples", "build", "setup.py")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
