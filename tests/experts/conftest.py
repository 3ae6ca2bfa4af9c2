"""The example out-of-tree expert, pip-installed into this environment for the session and removed after."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from medplib.core import plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "medplib-expert-modality"
DISTRIBUTION = "medplib-expert-modality"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[metadata.EntryPoint]:
    """Installed as a user would (no network: no deps, no build isolation), from a copy, so pip's
    in-tree build leaves nothing in the repository; registered in this process too."""
    try:
        metadata.distribution(DISTRIBUTION)
        installed_before = True
    except metadata.PackageNotFoundError:
        installed_before = False
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("example") / EXAMPLE.name)
    pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", str(source))
    importlib.invalidate_caches()
    (entry_point,) = metadata.entry_points(group=plugins.ENTRY_POINT_GROUP, name="modality")
    plugins.load_plugins()
    if plugins.pm.get_plugin("modality") is None:
        assert plugins.load_entry_point(entry_point)
    yield entry_point
    plugins.pm.unregister(name="modality")
    if not installed_before:
        pip("uninstall", "-y", "-q", DISTRIBUTION)


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_torch_thread: None) -> None:
    """Every expert test runs torch on one thread (see `one_torch_thread`)."""


@pytest.fixture(scope="session")
def example_module() -> Iterator[object]:
    """The example expert registered in this process from the repository (no pip), for tests of the
    model and training; the pip-installed path is `example_plugin`'s."""
    already = plugins.pm.get_plugin("modality")
    if already is not None:
        yield already
        return
    sys.path.insert(0, str(EXAMPLE))
    module = importlib.import_module("medplib_expert_modality")
    plugins.load_plugins()
    assert plugins.register_plugin(module, "modality", "example")
    yield module
    plugins.pm.unregister(module)
    sys.path.remove(str(EXAMPLE))
