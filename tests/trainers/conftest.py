"""The embedded dataset, built once per test session through the command line (about 6 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medplib.cli import app


@pytest.fixture(scope="session")
def built_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh `medplib data build OUT` with the default options."""
    out = tmp_path_factory.mktemp("embedded") / "dataset"
    result = CliRunner().invoke(app, ["data", "build", str(out)])
    assert result.exit_code == 0, result.output
    assert "G grounding" in result.output and f"wrote {out}" in result.output
    return out


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray: starts a local Ray cluster (select with -m ray, skip with -m 'not ray')"
    )
