"""The plugin manager: built-ins as ordinary plugins, env-var filtering, and bad plugins reported by name."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core import plugins
from medplib.core.errors import InvalidInputError, PluginError
from medplib.core.expert_spec import ExpertSpec, LoraSpec
from medplib.core.hookspecs import hookimpl

VALID = {"name": "echo", "capabilities": ["vqa"]}


class ExpertsPlugin:
    """A throw-away plugin that registers whatever it is given."""

    def __init__(self, *specs: Any) -> None:
        self.specs = specs

    @hookimpl
    def medplib_register_experts(self, register) -> None:
        for spec in self.specs:
            register(spec)


def problems_of(name: str) -> list[str]:
    return [problem.reason for problem in plugins.plugin_problems() if problem.plugin == name]


def test_builtins_are_ordinary_plugins_listed_first() -> None:
    experts = plugins.get_experts()
    assert list(experts)[:2] == ["vision_language", "pixel_grounding"]
    assert {experts[name].source for name in ("vision_language", "pixel_grounding")} == {"builtin"}
    for module in plugins.BUILTIN_PLUGINS:
        assert plugins.pm.get_plugin(module.rsplit(".", 1)[-1]) is not None
    assert not [p for p in plugins.plugin_problems() if p.source == "builtin"]


def test_a_plugin_registers_an_expert_as_a_spec_or_a_dict(register_plugin) -> None:
    assert register_plugin(ExpertsPlugin(ExpertSpec(**VALID), {**VALID, "name": "echo_dict"}), "echo_plugin")
    experts = plugins.get_experts()
    assert experts["echo"].source == experts["echo_dict"].source == "runtime"
    assert experts["echo_dict"].adapter == LoraSpec()


def test_duplicate_expert_name_is_reported_and_the_first_kept(register_plugin) -> None:
    register_plugin(ExpertsPlugin({**VALID, "name": "vision_language"}, VALID), "copycat")
    experts = plugins.get_experts()
    assert experts["vision_language"].source == "builtin"
    assert "echo" in experts  # the plugin's other registration still counts
    (reason,) = problems_of("copycat")
    assert "'vision_language' is already registered by plugin 'vision_language'" in reason


def test_invalid_spec_is_reported_by_plugin_and_field(register_plugin) -> None:
    register_plugin(ExpertsPlugin({"name": "Bad Name", "capabilities": []}, VALID), "sloppy")
    assert "echo" in plugins.get_experts() and "pixel_grounding" in plugins.get_experts()
    (reason,) = problems_of("sloppy")
    assert reason.startswith("invalid ExpertSpec") and "name" in reason and "capabilities" in reason


def test_a_hook_that_raises_is_reported_and_others_still_load(register_plugin) -> None:
    class Crashing:
        @hookimpl
        def medplib_register_experts(self, register) -> None:
            ExpertSpec(name="x", capabilities=["vqa"], adapter={"r": 0})  # invalid before register is called

    register_plugin(Crashing(), "crashing")
    register_plugin(ExpertsPlugin(VALID), "fine")
    assert "echo" in plugins.get_experts()
    (reason,) = problems_of("crashing")
    assert "adapter.r" in reason


def test_plugin_that_fails_to_import_is_reported_by_name(register_plugin) -> None:
    broken = metadata.EntryPoint(name="broken", value="medplib_no_such_plugin_module", group="medplib")
    assert not plugins.load_entry_point(broken)
    (reason,) = problems_of("broken")
    assert "failed to import" in reason and "medplib_no_such_plugin_module" in reason
    assert {"vision_language", "pixel_grounding"} <= set(plugins.get_experts())


def test_unknown_hook_and_duplicate_plugin_name_are_reported(register_plugin) -> None:
    class Typo:
        @hookimpl
        def medplib_register_expert(self, register) -> None:  # missing "s": no such hook
            raise AssertionError("never called")

    assert not register_plugin(Typo(), "typo")
    assert plugins.pm.get_plugin("typo") is None
    assert "unknown hook" in problems_of("typo")[0]
    assert not register_plugin(ExpertsPlugin(VALID), "vision_language")
    assert "already registered" in problems_of("vision_language")[0]
    assert plugins.get_experts()["vision_language"].source == "builtin"


@pytest.mark.parametrize(
    ("value", "loaded"),
    [(None, ["alpha", "beta"]), ("", []), ("beta", ["beta"]), (" alpha , gamma ", ["alpha"])],
)
def test_env_var_limits_which_entry_points_load(value: str | None, loaded: list[str]) -> None:
    available = [metadata.EntryPoint(name, f"{name}_module", "medplib") for name in ("alpha", "beta")]
    environ = {} if value is None else {plugins.ENV_VAR: value}
    assert [ep.name for ep in plugins.selected_entry_points(environ, available)] == loaded


def test_datasets_tools_and_the_before_tool_call_hook(register_plugin) -> None:
    class Tool:
        name = "count_cells"

    class Extras:
        @hookimpl
        def medplib_register_datasets(self, register) -> None:
            register("cells", lambda root, split: iter(()))
            register("Bad Name", print)

        @hookimpl
        def medplib_register_tools(self, register) -> None:
            register(Tool())
            register(object())

        @hookimpl
        def medplib_before_tool_call(self, tool_name: str, arguments: dict) -> None:
            if arguments.get("image") == "forbidden":
                raise InvalidInputError(f"{tool_name}: image refused")
            arguments.setdefault("threshold", 0.5)

    register_plugin(Extras(), "extras")
    assert "cells" in plugins.get_datasets() and "count_cells" in plugins.get_tools()
    reasons = problems_of("extras")
    assert any("'Bad Name'" in r for r in reasons) and any("has no name" in r for r in reasons)
    arguments: dict[str, Any] = {"image": "a.png"}
    plugins.before_tool_call("count_cells", arguments)
    assert arguments == {"image": "a.png", "threshold": 0.5}
    with pytest.raises(InvalidInputError, match="refused"):
        plugins.before_tool_call("count_cells", {"image": "forbidden"})


def test_require_experts_names_the_missing_ones() -> None:
    assert [s.name for s in plugins.require_experts(["pixel_grounding"])] == ["pixel_grounding"]
    with pytest.raises(PluginError, match="not registered: nope, nada"):
        plugins.require_experts(["vision_language", "nope", "nada"])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "Has Space"}, "name"),
        ({"capabilities": []}, "capabilities"),
        ({"capabilities": ["VQA!"]}, "capabilities"),
        ({"special_tokens": ["SEG"]}, "special_tokens"),
        ({"head": "not a path"}, "head"),
        ({"adapter": {"target_modules": ["q_proj"]}}, "adapter.target_modules"),
        ({"adapter": {"target_modules": ["up_proj", "up_proj"]}}, "adapter.target_modules"),
        ({"adapter": {"layers": [-1]}}, "adapter.layers"),
        ({"loss_weights": {"dice": -1}}, "loss_weights.dice"),
        ({"resources": {"num_gpus": -0.5}}, "resources.num_gpus"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_expert_specs_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ExpertSpec.model_validate({**VALID, **changes})
    assert any(".".join(map(str, e["loc"])).startswith(field) for e in info.value.errors())


def test_spec_helpers() -> None:
    spec = plugins.get_experts()["pixel_grounding"]
    assert spec.adapter.scaling == 2.0
    assert spec.trains_on.accepts("grounding") and not spec.trains_on.accepts("vqa")
    assert ExpertSpec(**VALID, resources={"memory_gb": 1}).resources.ray_options()["memory"] == 2**30


def test_cli_lists_experts_and_warns_about_bad_plugins(register_plugin) -> None:
    register_plugin(ExpertsPlugin({"name": "broken spec", "capabilities": ["vqa"]}), "sloppy")
    result = CliRunner().invoke(app, ["experts"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "capabilities", "source"]
    assert lines[1].split()[0] == "vision_language" and lines[1].endswith("builtin")
    assert "warning: plugin 'sloppy' (runtime): invalid ExpertSpec" in result.stderr
    payload = json.loads(CliRunner().invoke(app, ["experts", "--json"]).stdout)
    by_name = {expert["name"]: expert for expert in payload["experts"]}
    assert by_name["pixel_grounding"]["special_tokens"] == ["<SEG>"]
    assert by_name["pixel_grounding"]["source"] == "builtin"
    assert [p["plugin"] for p in payload["problems"]] == ["sloppy"]


def test_listing_experts_does_not_import_torch() -> None:
    code = "import sys; from medplib.core.plugins import get_experts as g; g(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
