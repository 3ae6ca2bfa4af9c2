"""A plugin expert's whole path, on the tiny preset, as a user takes it: the plugin guide's commands in
docs/experts.md run as written (the example installed by pip, its expert stage trained, a three-expert
stage IV composed), then the composed model asked for the plugin's capability in process, served on
a local Ray Serve (its head in its own `Expert-modality` deployment), called over HTTP and through
the capability's LangChain tool, with a before-call hook that refuses one call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import ToolMessage

import medplib
from medplib.core import plugins
from medplib.core.errors import InvalidInputError
from medplib.core.hookspecs import hookimpl
from medplib.core.io.registry_data import dicom_file

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "experts.md"
MARKER = "<!-- run as written by tests/experts/test_plugin_end_to_end.py -->"
EXPERTS = ["vision_language", "pixel_grounding", "modality"]
CAPABILITY = "modality_classification"
QUESTION = "What imaging modality was used for this image?"
TOKENS = 8


def guide_commands() -> list[str]:
    """The command lines of the fenced block the guide marks (the marker line right above its fence)."""
    text = GUIDE.read_text()
    assert text.count(MARKER) == 1, f"{GUIDE} must mark exactly one block with {MARKER!r}"
    block = re.search(re.escape(MARKER) + r"\n```(?:bash|sh)\n(.*?)\n```", text, re.S)
    assert block is not None, f"the line after {MARKER!r} must open a bash block"
    return [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the guide's commands in a fresh folder holding a copy of the example (so pip's build leaves
    nothing in the repository). The command lines are the guide's; the environment makes pip work
    offline (no index, no build isolation, no dependencies: medplib is installed) and install into
    `site/` in that folder, which the later commands (and this process, and Ray's workers) import
    from, so the test neither changes the shared environment nor sees another copy installed there."""
    cwd = tmp_path_factory.mktemp("guide")
    shutil.copytree(
        REPO / "examples" / "medplib-expert-modality", cwd / "examples" / "medplib-expert-modality"
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(cwd / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PIP_TARGET": str(cwd / "site"),
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip reads "0" as: do not isolate (it cannot download setuptools)
        "PIP_NO_DEPS": "1",
        "PIP_QUIET": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop(plugins.ENV_VAR, None)
    for command in guide_commands():
        done = subprocess.run(
            command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return cwd


@pytest.fixture(scope="module")
def modality_registered(guide_run: Path) -> Iterator[str]:
    """The example as the guide installed it, importable here (and by Ray's workers, through
    PYTHONPATH) and registered in this process (unless a test registered the repository's copy)."""
    import importlib

    site = str(guide_run / "site")
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    plugins.load_plugins()
    if plugins.pm.get_plugin("modality") is None:
        (entry_point,) = metadata.entry_points(group=plugins.ENTRY_POINT_GROUP, name="modality")
        assert plugins.load_entry_point(entry_point)
    yield site
    sys.path.remove(site)


def test_the_plugin_guide_runs_as_written(guide_run: Path) -> None:
    commands = guide_commands()
    assert commands[0] == "pip install ./examples/medplib-expert-modality"
    assert any("--stage expert --expert modality" in c for c in commands)
    runs = guide_run / "runs"
    expert_stage = json.loads((runs / "modality" / "stage.json").read_text())
    assert list(expert_stage["adapters"]) == EXPERTS and expert_stage["active"] == "modality"
    tokens = json.loads((runs / "modality" / "model" / "tokenizer.json").read_text())["added_tokens"]
    assert "<MOD>" in {token["content"] for token in tokens}
    moe = json.loads((runs / "moe" / "stage.json").read_text())
    assert moe["experts"] == EXPERTS and moe["active"] == "moe"
    # The guide's own environment: the plugin is importable from `site/` alone, whatever ran before.
    site_first = os.pathsep.join([str(guide_run / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    listed = subprocess.run(
        [sys.executable, "-m", "medplib.cli", "info", str(runs / "moe"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": site_first},
    )
    assert [(e["name"], e["role"]) for e in json.loads(listed.stdout)["experts"]] == [
        (name, "routed") for name in EXPERTS
    ]


class RefusesMR:
    """A policy plugin: refuses any tool call on the second image."""

    def __init__(self) -> None:
        self.tools: list[str] = []

    @hookimpl
    def medplib_before_tool_call(self, tool_name: str, arguments: dict[str, Any]) -> None:
        self.tools.append(tool_name)
        if arguments["image"] == "img-2":
            raise InvalidInputError("img-2 is not for agents")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(guide_run: Path, modality_registered: str) -> Iterator[str]:
    """The stage IV model on a local Ray Serve, its plugin head in `Expert-modality`."""
    import ray
    from ray import serve

    from medplib.agents.serve.app import deploy
    from medplib.agents.serve.config import ServeConfig

    assert not ray.is_initialized(), "one local Ray cluster at a time: another test left one running"
    path = os.pathsep.join([modality_registered, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    config = ServeConfig.from_yaml(REPO / "examples" / "serve" / "cpu.yaml").with_overrides(
        app_name="plugin-e2e",
        model=str(guide_run / "runs" / "moe"),
        http={"port": free_port()},
        deployments={"trunk": {"torch_threads": 1}, "grounding": {"torch_threads": 1}},
        plugin_experts={"modality": {"resources": {"num_cpus": 0.5}, "torch_threads": 1}},
    )
    url = deploy(config)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.mark.ray
def test_the_composed_model_answers_its_capability_in_process_over_http_and_as_a_tool(
    guide_run: Path, served: str, register_plugin: Any
) -> None:
    from medplib_expert_modality.outputs import MODALITIES

    from medplib.agents import MedPLIBToolkit
    from medplib.agents.serve.client import MedPLIBClient

    ct = dicom_file("CT_small.dcm")
    model = medplib.load(str(guide_run / "runs" / "moe"), device="cpu")
    assert [info.name for info in model.experts() if info.trained] == EXPERTS
    asked = model.answer(str(ct), QUESTION, capability=CAPABILITY, max_new_tokens=TOKENS)
    (prediction,) = asked.outputs["modality"]
    assert prediction["modality"] in MODALITIES and set(prediction["probabilities"]) == set(MODALITIES)

    client = MedPLIBClient(served, timeout=120)
    listed = {expert.spec.name: expert for expert in client.experts().experts}
    assert list(listed) == EXPERTS and listed["modality"].deployments == ["Trunk", "Expert-modality"]
    assert set(listed["modality"].output_schema["properties"]) == {"modality", "probability", "probabilities"}
    over_http = client.vqa(ct, QUESTION, capability=CAPABILITY, max_new_tokens=TOKENS)
    assert over_http.text == asked.text and over_http.forced == asked.forced
    (served_prediction,) = over_http.outputs["modality"]  # run by the Expert-modality deployment
    assert served_prediction["modality"] == prediction["modality"]
    assert served_prediction["probability"] == pytest.approx(prediction["probability"], abs=1e-5)
    unknown = httpx.post(
        f"{served}/v1/vqa",
        json={"image": {"uri": str(ct)}, "question": QUESTION, "capability": "laterality"},
        timeout=60,
    )
    assert unknown.status_code == 400 and "unknown capability 'laterality'" in unknown.json()["message"]

    gate = RefusesMR()
    register_plugin(gate, "refuses-mr")
    toolkit = MedPLIBToolkit.from_url(served, decoding={"max_new_tokens": TOKENS})
    scan, other = toolkit.images.put(str(ct)), toolkit.images.put(str(dicom_file("MR_small.dcm")))
    (tool,) = [t for t in toolkit.get_tools() if t.name == CAPABILITY]
    call = {"type": "tool_call", "id": "1", "name": CAPABILITY, "args": {"image": scan, "question": QUESTION}}
    message = tool.invoke(call)
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert message.artifact.outputs == over_http.outputs["modality"]
    refused = tool.invoke({**call, "id": "2", "args": {"image": other, "question": QUESTION}})
    assert refused.status == "error" and "img-2 is not for agents" in refused.content
    assert gate.tools == [CAPABILITY, CAPABILITY]
