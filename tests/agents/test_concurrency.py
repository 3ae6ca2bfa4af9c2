"""Concurrent calls: async ones keep the event loop free and give what the same calls give one by one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.tools import BaseTool

from medplib.agents import InProcessBackend, MedPLIBToolkit
from medplib.core.assistant import MedPLIB

CALLS: list[tuple[str, dict[str, Any]]] = [
    ("medical_vqa", {"image": "img-1", "question": "What modality is this?"}),
    ("medical_vqa", {"image": "img-2", "question": "Which organ is shown?"}),
    (
        "medical_region_vqa",
        {
            "image": "img-1",
            "question": "What is in {region}?",
            "regions": [{"kind": "box", "box": [8, 8, 40, 40]}],
        },
    ),
    ("medical_grounding", {"image": "img-2", "target": "the brain"}),
    ("medical_grounding", {"image": "img-1", "target": "the lung"}),
]


def tool_call(name: str, args: dict[str, Any], index: int) -> ToolCall:
    return ToolCall(name=name, args=args, id=f"call-{index}", type="tool_call")


def outcome(message: ToolMessage) -> Any:
    """What must not depend on how calls interleave: the text, or a grounding's masks."""
    assert message.status == "success", message.content
    return message.artifact.result.masks if message.artifact is not None else message.content


async def test_concurrent_async_calls_match_sequential_ones(tools: dict[str, BaseTool], mr_path: str) -> None:
    assert tools["medical_vqa"].images.put(mr_path) == "img-2"
    sequential = [
        outcome(tools[name].invoke(tool_call(name, args, i))) for i, (name, args) in enumerate(CALLS)
    ]

    done = asyncio.Event()
    ticks = 0

    async def tick() -> None:  # runs only while the loop is free
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.002)

    async def all_calls() -> list[ToolMessage]:
        try:
            return await asyncio.gather(
                *(tools[n].ainvoke(tool_call(n, a, i)) for i, (n, a) in enumerate(CALLS))
            )
        finally:
            done.set()

    messages, _ = await asyncio.gather(all_calls(), tick())
    assert [outcome(message) for message in messages] == sequential
    assert [message.tool_call_id for message in messages] == [f"call-{i}" for i in range(len(CALLS))]
    assert ticks > len(CALLS)  # the loop kept turning while the model worked


def test_parallel_sync_calls_are_serialised_per_model(
    tiny_model: MedPLIB, make_toolkit: Callable[..., MedPLIBToolkit], monkeypatch: Any
) -> None:
    """LangGraph runs an AI message's tool calls on threads; two toolkits may share one model."""
    first, second = make_toolkit(), make_toolkit()
    assert first.backend._guard is second.backend._guard is InProcessBackend(tiny_model)._guard
    running, most = 0, 0
    lock = threading.Lock()
    answer = type(tiny_model).answer

    def counted(self: MedPLIB, *args: Any, **kwargs: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return answer(self, *args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(type(tiny_model), "answer", counted)
    vqa = [tool for toolkit in (first, second) for tool in toolkit.get_tools() if tool.name == "medical_vqa"]
    with ThreadPoolExecutor(4) as pool:
        contents = list(
            pool.map(lambda i: vqa[i % 2].invoke({"image": "img-1", "question": "Why?"}), range(4))
        )
    assert most == 1 and len(set(contents)) == 1
