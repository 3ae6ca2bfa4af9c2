"""The example agent (examples/agent_workflow.py), driven offline by a scripted tool-calling chat model.

The agent asks a VQA question, grounds the finding, and its final message cites both results. The
final message is written from the ToolMessages the model is sent, so the test checks what the tools
really returned, not a script.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

import medplib
from medplib.agents import GroundingArtifact, MedPLIBToolkit
from medplib.core.assistant import MedPLIB

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_workflow.py"


@pytest.fixture(scope="module")
def workflow() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_workflow", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ScriptedToolCallingModel(FakeMessagesListChatModel):
    """Answers turn k with `responses[k]` (turns counted by the AI messages it is sent, so it keeps no
    state between runs), then with `conclude(messages)`. Accepts `bind_tools`, as an agent needs."""

    conclude: Callable[[list[BaseMessage]], str]

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        turn = sum(isinstance(message, AIMessage) for message in messages)
        done = turn >= len(self.responses)
        reply = AIMessage(self.conclude(messages)) if done else self.responses[turn]
        return ChatResult(generations=[ChatGeneration(message=reply)])


def cite_tool_results(messages: list[BaseMessage]) -> str:
    results = {m.name: m.content for m in messages if isinstance(m, ToolMessage)}
    return (
        f"The model's answer: {results['medical_vqa']}\nWhere the finding is: {results['medical_grounding']}"
    )


def scripted_agent_model(image_id: str, question: str) -> ScriptedToolCallingModel:
    vqa = {"name": "medical_vqa", "args": {"image": image_id, "question": question}, "id": "call-vqa"}
    ground = {
        "name": "medical_grounding",
        "args": {"image": image_id, "target": "the lesion"},
        "id": "call-ground",
    }
    return ScriptedToolCallingModel(
        responses=[AIMessage("", tool_calls=[vqa]), AIMessage("", tool_calls=[ground])],
        conclude=cite_tool_results,
    )


def test_the_agent_asks_then_grounds_then_cites_both(
    workflow: ModuleType, make_toolkit: Callable[..., MedPLIBToolkit], tiny_model: MedPLIB, ct_path: str
) -> None:
    toolkit = make_toolkit()
    question = "Is there a lesion in this CT slice?"
    messages = workflow.run_workflow(scripted_agent_model("img-1", question), toolkit, "img-1", question)

    assert isinstance(messages[0], HumanMessage) and "img-1" in messages[0].content
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "ToolMessage", "AIMessage"]
    vqa, grounding, final = messages[2], messages[4], messages[-1]
    assert (vqa.name, vqa.status, vqa.tool_call_id) == ("medical_vqa", "success", "call-vqa")
    assert (grounding.name, grounding.status, grounding.tool_call_id) == (
        "medical_grounding",
        "success",
        "call-ground",
    )
    # The tool results are the model's, and the final message cites them both.
    direct = tiny_model.answer(ct_path, question, **toolkit.decoding).text.strip()
    assert vqa.content == (direct or "(the model gave an empty answer)")
    assert isinstance(grounding.artifact, GroundingArtifact) and grounding.artifact.mask_ids == ["mask-1"]
    assert grounding.content.startswith("Segmented 'the lesion' in img-1") and "mask-1" in grounding.content
    assert vqa.content in final.content and grounding.content in final.content
    assert not final.tool_calls


def test_a_tool_error_reaches_the_agent_as_a_message(
    workflow: ModuleType, make_toolkit: Callable[..., MedPLIBToolkit]
) -> None:
    messages = workflow.run_workflow(scripted_agent_model("img-9", "What is this?"), make_toolkit(), "img-9")
    errors = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.status for m in errors] == ["error", "error"]
    assert all("unknown image id 'img-9'" in m.content for m in errors)
    assert errors[0].content in messages[-1].content


def test_the_transcript_shows_calls_and_results(workflow: ModuleType) -> None:
    messages = [
        HumanMessage("Q (image: img-1)"),
        AIMessage("", tool_calls=[{"name": "medical_vqa", "args": {"image": "img-1"}, "id": "1"}]),
        ToolMessage("an answer", name="medical_vqa", tool_call_id="1"),
        AIMessage("done"),
    ]
    assert workflow.show(messages).splitlines() == [
        "human: Q (image: img-1)",
        "-> medical_vqa({'image': 'img-1'})",
        "<- medical_vqa [success]: an answer",
        "assistant: done",
    ]


def test_the_script_runs_with_any_chat_model(
    workflow: ModuleType,
    tiny_model: MedPLIB,
    ct_path: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`main` wired up: the model named by --chat-model (scripted here), the scan stored as img-1."""
    create_agent = workflow.create_agent
    scripted = scripted_agent_model("img-1", workflow.DEFAULT_QUESTION)
    monkeypatch.setattr(
        workflow, "create_agent", lambda _name, tools, **kw: create_agent(scripted, tools, **kw)
    )
    monkeypatch.setattr(medplib, "load", lambda name: tiny_model)
    assert workflow.main([ct_path, "--chat-model", "any:model", "--max-new-tokens", "3"]) == 0
    transcript = capsys.readouterr().out.splitlines()
    assert transcript[0] == f"human: {workflow.DEFAULT_QUESTION} (image: img-1)"
    assert transcript[1] == f"-> medical_vqa({{'image': 'img-1', 'question': '{workflow.DEFAULT_QUESTION}'}})"
    assert any(line.startswith("<- medical_grounding [success]: Segmented") for line in transcript)
    assert any(line.startswith("assistant: The model's answer:") for line in transcript)
