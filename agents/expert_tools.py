"""A LangChain tool per plugin capability, generated from the expert's spec.

A plugin expert with a head (`ExpertSpec.head`) gives each of its capabilities a tool named after
it (`modality_classification`): the description is the spec's, its arguments an image and a question,
and a call asks the model with `capability=` through the toolkit's backend, so the head's outputs come
back from the in-process model or a `medplib serve` server alike. The content is the answer and the
outputs as compact JSON (what an LLM reasons with); the artifact an `ExpertArtifact`, the whole result.
The tools are `MedPLIBTool`s: the same image store, the same `medplib_before_tool_call` hook and the
same errors as the built-in tools.

Which experts: those the backend's model holds (`backend.expert_specs()`, when the backend can say),
else every installed plugin expert with a head. The built-in experts have their own tools.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from medplib.agents.image_store import StoredImage
from medplib.agents.tools import MedPLIBTool, ToolInput
from medplib.core import plugins
from medplib.core.expert_spec import ExpertSpec
from medplib.core.results import AnswerResult

BUILTIN_SOURCE = "builtin"


class ExpertArtifact(BaseModel):
    """The artifact of a capability tool (the application's, not the LLM's)."""

    model_config = ConfigDict(frozen=True)

    expert: str = Field(description="the expert whose head answered")
    capability: str
    outputs: list[dict[str, Any]] = Field(description="its head's outputs, one per trigger token")
    result: AnswerResult = Field(description="the model's whole result")


class ExpertCapabilityTool(MedPLIBTool):
    """One capability of a plugin expert (made by `capability_tool`)."""

    expert: str = Field(exclude=True)
    capability: str = Field(exclude=True)
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    backend_method: ClassVar[Literal["answer", "ground"]] = "answer"

    def _backend_kwargs(self) -> dict[str, Any]:
        return {**self.decoding, "capability": self.capability}

    def _backend_args(self, args: Any, image: StoredImage) -> tuple[Any, ...]:
        return image, args.question

    def _output(self, args: Any, image: StoredImage, result: AnswerResult) -> tuple[str, ExpertArtifact]:
        outputs = list(result.outputs.get(self.expert, []))
        artifact = ExpertArtifact(
            expert=self.expert, capability=self.capability, outputs=outputs, result=result
        )
        lines = [f"{self.capability} on {args.image}: the model answered {result.text.strip()!r}."]
        if outputs:
            lines.append(f"The {self.expert} expert's output: {json.dumps(outputs, separators=(',', ':'))}")
        else:
            lines.append(f"The {self.expert} expert gave no output (its token did not reach its head).")
        if result.forced:
            lines.append("Caution: the model did not call the expert on its own (its token was forced).")
        return "\n".join(lines), artifact


def capability_tool(
    spec: ExpertSpec, capability: str, output_schema: dict[str, Any] | None, **fields: Any
) -> ExpertCapabilityTool:
    """The tool of `capability` of `spec`; `fields` are `MedPLIBTool`'s (backend, images, decoding, ...)."""
    arguments = create_model(  # its own schema title, so an LLM sees which capability it fills
        "".join(part.title() for part in capability.split("_")) + "Input",
        __base__=ToolInput,
        __doc__=f"The image and the question for {capability}.",
        question=(
            str,
            Field(min_length=1, description=f"the question to ask about the image, for {capability}"),
        ),
    )
    produces = ""
    if output_schema:
        described = ", ".join(
            f"{name} ({field.get('description', field.get('type', ''))})"
            for name, field in output_schema.get("properties", {}).items()
        )
        produces = f" Returns the answer and the expert's output: {described}."
    about = spec.description.strip() or f"The {spec.name} expert."
    return ExpertCapabilityTool(
        name=capability,
        description=f"{about} (medplib expert {spec.name!r}, capability {capability!r}).{produces}",
        args_schema=arguments,
        expert=spec.name,
        capability=capability,
        **fields,
    )


def plugin_capability_tools(backend: Any, **fields: Any) -> list[ExpertCapabilityTool]:
    """A tool per capability of each plugin expert with a head that `backend`'s model holds."""
    held = getattr(backend, "expert_specs", None)
    if held is not None:
        experts = held()
    else:
        installed = [spec for spec in plugins.get_experts().values() if _has_tools(spec)]
        experts = [(spec, spec.output_schema()) for spec in installed]
    return [
        capability_tool(spec, capability, schema, backend=backend, **fields)
        for spec, schema in experts
        if _has_tools(spec)
        for capability in spec.capabilities
    ]


def _has_tools(spec: ExpertSpec) -> bool:
    return spec.head is not None and spec.source != BUILTIN_SOURCE
