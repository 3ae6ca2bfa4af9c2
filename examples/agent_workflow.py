"""An agent that asks medplib about a scan, then grounds what it found, and answers citing both.

    python examples/agent_workflow.py --model tiny --chat-model openai:gpt-4.1-mini scan.dcm

`--chat-model` is any tool-calling chat model `langchain.agents.create_agent` accepts as a string
(`provider:model`; the provider's package and API key must be installed and set). The agent is
LangChain 1.x's `create_agent`, which runs on LangGraph. The `tiny` preset has random weights, so its
answers are noise: load a trained checkpoint (`--model path/or/uri`) for real ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from medplib.agents import ImageStore, MedPLIBToolkit

SYSTEM_PROMPT = (
    "You help a clinician read a medical image. Images are named by ids such as 'img-1'. First ask "
    "medical_vqa the clinician's question. Then locate the finding it names with medical_grounding. "
    "Answer in a few sentences that cite both results: the answer medical_vqa gave, and where "
    "medical_grounding found the finding (share of the image, location, confidence). If a tool "
    "reports an error, fix the arguments it names and call it again."
)
DEFAULT_QUESTION = "What abnormality is visible in this image?"


def build_agent(chat_model: str | BaseChatModel, toolkit: MedPLIBToolkit) -> Any:
    return create_agent(chat_model, toolkit.get_tools(), system_prompt=SYSTEM_PROMPT)


def run_workflow(
    chat_model: str | BaseChatModel, toolkit: MedPLIBToolkit, image_id: str, question: str = DEFAULT_QUESTION
) -> list[BaseMessage]:
    """The whole conversation: the request, each tool call and result, the final answer last."""
    agent = build_agent(chat_model, toolkit)
    state = agent.invoke({"messages": [HumanMessage(f"{question} (image: {image_id})")]})
    return state["messages"]


def show(messages: Sequence[BaseMessage]) -> str:
    lines = []
    for message in messages:
        if isinstance(message, AIMessage):
            lines += [f"-> {call['name']}({call['args']})" for call in message.tool_calls]
            if message.content:
                lines.append(f"assistant: {message.text}")
        elif isinstance(message, ToolMessage):
            lines.append(f"<- {message.name} [{message.status}]: {message.text}")
        else:
            lines.append(f"{message.type}: {message.text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="a path or URI of a PNG, JPEG, TIFF, DICOM or NIfTI image")
    parser.add_argument("--model", default="tiny", help="medplib preset, or checkpoint path or URI")
    parser.add_argument("--chat-model", required=True, help="provider:model, e.g. openai:gpt-4.1-mini")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import medplib

    try:
        model = medplib.load(args.model)
    except medplib.MedplibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The agent may read only the image put in the store here, whatever paths its input names.
    images = ImageStore(allowed_prefixes=())
    decoding = {"max_new_tokens": args.max_new_tokens}
    toolkit = MedPLIBToolkit.from_model(model, images=images, decoding=decoding)
    image_id = toolkit.images.put(args.image)
    print(show(run_workflow(args.chat_model, toolkit, image_id, args.question)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
