"""A LangChain tool per plugin capability, generated from the expert's spec, through the toolkit's
backend, image store and `medplib_before_tool_call` hook (in process here; over HTTP in
tests/experts/test_plugin_end_to_end.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage

import medplib
from medplib.agents import MedPLIBToolkit
from medplib.agents.expert_tools import ExpertArtifact, ExpertCapabilityTool
from medplib.core.assistant import MedPLIB
from medplib.core.errors import InvalidInputError
from medplib.core.hookspecs import hookimpl

TOKENS = 3
CAPABILITY = "modality_classification"


@pytest.fixture(scope="module")
def modality_model(modality_checkpoint: Path) -> MedPLIB:
    return medplib.load(str(modality_checkpoint), device="cpu")


class Refuses:
    """A policy plugin: refuses the capability tool on one image, records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def medplib_before_tool_call(self, tool_name: str, arguments: dict[str, Any]) -> None:
        self.calls.append((tool_name, dict(arguments)))
        if arguments["image"] == "img-2":
            raise InvalidInputError("img-2 may not be classified")


def capability_tool(toolkit: MedPLIBToolkit) -> ExpertCapabilityTool:
    (found,) = [t for t in toolkit.get_tools() if t.name == CAPABILITY]
    assert isinstance(found, ExpertCapabilityTool)
    return found


async def test_a_plugin_capability_is_a_tool_that_returns_its_heads_output(
    modality_model: MedPLIB, tiny_model: MedPLIB, ct_path: str, mr_path: str, register_plugin: Any
) -> None:
    gate = Refuses()
    register_plugin(gate, "gate")
    toolkit = MedPLIBToolkit.from_model(modality_model, decoding={"max_new_tokens": TOKENS})
    scan, other = toolkit.images.put(ct_path), toolkit.images.put(mr_path)
    tool = capability_tool(toolkit)
    assert tool.backend is toolkit.backend and tool.images is toolkit.images
    assert tool.description.startswith("Recognises the imaging modality")
    assert "modality (the most probable imaging modality)" in tool.description
    schema = tool.args_schema.model_json_schema()
    assert schema["title"] == "ModalityClassificationInput" and set(schema["required"]) == {
        "image",
        "question",
    }

    call = {"image": scan, "question": "Which modality is this?"}
    message = tool.invoke({"type": "tool_call", "id": "1", "name": CAPABILITY, "args": call})
    assert isinstance(message, ToolMessage) and message.status == "success"
    artifact = message.artifact
    assert isinstance(artifact, ExpertArtifact) and artifact.expert == "modality"
    expected = modality_model.answer(ct_path, call["question"], capability=CAPABILITY, max_new_tokens=TOKENS)
    assert artifact.outputs == expected.outputs["modality"] and len(artifact.outputs) == 1
    assert json.dumps(artifact.outputs, separators=(",", ":")) in message.content
    assert artifact.result.forced == expected.forced and ("forced" in message.content) == expected.forced

    async_message = await tool.ainvoke({"type": "tool_call", "id": "2", "name": CAPABILITY, "args": call})
    assert async_message.artifact.outputs == artifact.outputs

    refused = tool.invoke(
        {"type": "tool_call", "id": "3", "name": CAPABILITY, "args": {**call, "image": other}}
    )
    assert (
        refused.status == "error" and "modality_classification was refused: img-2 may not" in refused.content
    )
    assert [name for name, _ in gate.calls] == [CAPABILITY] * 3

    # A model that does not hold the expert is offered no tool for it.
    without = MedPLIBToolkit.from_model(tiny_model).get_tools()
    assert CAPABILITY not in [t.name for t in without]
