"""Listing checks beyond the schema: import paths, `trains_on` tasks, token collisions, `MEDPLIB_PLUGINS`
names; each problem is one `warning:` line naming the plugin and the field."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core import plugins
from medplib.core.expert_checks import import_path_problem
from medplib.core.hookspecs import hookimpl

VALID = {"name": "laterality", "capabilities": ["laterality_vqa"], "special_tokens": ["<LAT>"]}


class ExpertsPlugin:
    def __init__(self, *specs: dict) -> None:
        self.specs = specs

    @hookimpl
    def medplib_register_experts(self, register) -> None:
        for spec in self.specs:
            register(spec)


@pytest.fixture
def heavy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A head module that cannot run here (it imports a package that does not exist): listing must
    find its factory without running it."""
    package = tmp_path / "laterality_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "head.py").write_text(
        textwrap.dedent(
            """
            import medplib_no_such_heavy_dependency as torch

            try:
                from medplib_no_such_heavy_dependency import nn
            except ImportError:
                Fallback = None

            def build_head(config):
                return torch.nn.Linear(config.hidden_size, 2)

            class LateralityOutput:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "laterality_plugin.head"


def test_import_paths_are_resolved_without_running_the_module(heavy_module: str) -> None:
    for name in ("build_head", "LateralityOutput", "torch", "nn", "Fallback"):
        assert import_path_problem(f"{heavy_module}:{name}") is None, name
    assert "defines no 'build_hed'" in import_path_problem(f"{heavy_module}:build_hed")
    assert heavy_module not in sys.modules
    assert import_path_problem("laterality_plugin.nohead:build_head") == (
        "no module named 'laterality_plugin.nohead'"
    )
    assert "cannot be found" in import_path_problem("medplib_no_such_package.head:build")
    assert import_path_problem("medplib.experts.pixel_grounding.head:build_grounding_head") is None


def listing_warnings(register_plugin, plugin: object, name: str) -> tuple[list[str], list[str]]:
    register_plugin(plugin, name)
    result = CliRunner().invoke(app, ["experts"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    return listed, result.stderr.splitlines()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"head": "laterality_plugin.nohead:build_head"},
            "expert 'laterality': head: no module named 'laterality_plugin.nohead'",
        ),
        ({"head": "laterality_plugin.head:build_hed"}, "head: module 'laterality_plugin.head' ("),
        (
            {"trains_on": {"tasks": ["vqa", "laterality"]}},
            "trains_on.tasks: unknown task(s) 'laterality' (known: caption, vqa, region_vqa, grounding)",
        ),
        (
            {"special_tokens": ["<LAT>", "<SEG>"]},
            "special_tokens: <SEG> is already the token of expert 'pixel_grounding' (builtin)",
        ),
        ({"special_tokens": ["<LAT>", "<LAT>"]}, "special_tokens: <LAT> listed twice"),
    ],
)
def test_each_listing_problem_is_one_warning_naming_plugin_and_field(
    register_plugin, heavy_module: str, changes: dict, expected: str
) -> None:
    listed, warnings = listing_warnings(register_plugin, ExpertsPlugin({**VALID, **changes}), "lat")
    assert "laterality" not in listed and listed[:2] == ["vision_language", "pixel_grounding"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: plugin 'lat' (runtime): ") and expected in warnings[0]


def test_a_valid_plugin_with_a_head_in_an_unrun_module_is_listed(register_plugin, heavy_module: str) -> None:
    spec = {**VALID, "head": f"{heavy_module}:build_head", "trains_on": {"tasks": ["vqa"]}}
    listed, warnings = listing_warnings(register_plugin, ExpertsPlugin(spec), "lat")
    assert "laterality" in listed and warnings == []
    assert heavy_module not in sys.modules


def test_a_second_expert_taking_a_plugins_token_is_refused_not_the_first(register_plugin) -> None:
    second = {**VALID, "name": "laterality_v2"}
    listed, warnings = listing_warnings(register_plugin, ExpertsPlugin(VALID, second), "lat")
    assert "laterality" in listed and "laterality_v2" not in listed
    assert warnings == [
        "warning: plugin 'lat' (runtime): expert 'laterality_v2': special_tokens: <LAT> is already the "
        "token of expert 'laterality' (runtime); each expert needs its own"
    ]


def test_a_spec_invalid_at_import_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugin builds its spec when imported: pydantic's several lines become one."""
    (tmp_path / "sloppy_plugin.py").write_text(
        "from medplib.core.expert_spec import ExpertSpec\n"
        "SPEC = ExpertSpec(name='Bad Name', capabilities=[], adapter={'r': 0})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_load_problems", [])
    entry_point = metadata.EntryPoint(name="sloppy", value="sloppy_plugin", group="medplib")
    assert not plugins.load_entry_point(entry_point)
    (problem,) = plugins._load_problems
    text = str(problem)
    assert "\n" not in text
    assert text.startswith("plugin 'sloppy' (sloppy_plugin): failed to import: invalid ExpertSpec: name: ")
    assert "capabilities: " in text and "adapter.r: " in text


def test_unknown_names_in_the_env_var_are_one_warning_each() -> None:
    available = [metadata.EntryPoint("alpha", "alpha_module", "medplib")]
    environ = {plugins.ENV_VAR: "alpha, modalty,"}
    assert plugins.unknown_plugin_names(environ, available) == ["modalty"]
    assert plugins.unknown_plugin_names({}, available) == []
    env = {**os.environ, plugins.ENV_VAR: "modalty"}
    command = [sys.executable, "-m", "medplib.cli", "experts"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=True)
    assert result.stderr.splitlines() == [
        "warning: plugin 'modalty' (MEDPLIB_PLUGINS): no installed plugin has this entry-point or "
        "distribution name (installed: " + result.stderr.split("(installed: ", 1)[1].strip()
    ]
    assert result.stdout.splitlines()[1].startswith("vision_language")
