"""The tools against langchain-tests' standard suites, their JSON schemas, and what each returns."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from PIL import Image

from medplib.agents import (
    GroundingArtifact,
    ImageStore,
    MedicalGroundingTool,
    MedicalRegionVQATool,
    MedicalVQATool,
    MedPLIBToolkit,
)
from medplib.core.assistant import MedPLIB
from medplib.core.masks import Mask, encode_png

EXAMPLES: dict[str, dict[str, Any]] = {
    "medical_vqa": {"image": "img-1", "question": "What modality is this?"},
    "medical_region_vqa": {
        "image": "img-1",
        "question": "What is in {region}, compared with {region}?",
        "regions": [{"kind": "box", "box": [32, 32, 96, 96]}, {"kind": "point", "points": [[20, 100]]}],
    },
    "medical_grounding": {"image": "img-1", "target": "the lung", "overlay": True},
}
CLASSES: dict[str, type[BaseTool]] = {
    "medical_vqa": MedicalVQATool,
    "medical_region_vqa": MedicalRegionVQATool,
    "medical_grounding": MedicalGroundingTool,
}


class UnusedBackend:
    """The unit suites build tools but never call them."""

    def answer(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a unit test called the backend")

    ground = answer

    async def aanswer(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a unit test called the backend")

    aground = aanswer


class _Unit(ToolsUnitTests):
    tool_name: ClassVar[str]

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return CLASSES[self.tool_name]

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"backend": UnusedBackend(), "images": ImageStore()}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return EXAMPLES[self.tool_name]


class _Integration(ToolsIntegrationTests):
    """On the in-process tiny model, with errors raised rather than handed to an agent, so a failing
    call fails the suite instead of passing as an error message."""

    tool_name: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _toolkit(self, make_toolkit: Callable[..., MedPLIBToolkit]) -> None:
        self.toolkit = make_toolkit(handle_tool_error=False)

    @property
    def tool_constructor(self) -> BaseTool:
        return next(tool for tool in self.toolkit.get_tools() if tool.name == self.tool_name)

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return EXAMPLES[self.tool_name]


class TestMedicalVQAToolUnit(_Unit):
    tool_name = "medical_vqa"


class TestMedicalRegionVQAToolUnit(_Unit):
    tool_name = "medical_region_vqa"


class TestMedicalGroundingToolUnit(_Unit):
    tool_name = "medical_grounding"


class TestMedicalVQAToolIntegration(_Integration):
    tool_name = "medical_vqa"


class TestMedicalRegionVQAToolIntegration(_Integration):
    tool_name = "medical_region_vqa"


class TestMedicalGroundingToolIntegration(_Integration):
    tool_name = "medical_grounding"


def _undescribed(schema: Any, where: str = "") -> list[str]:
    """Every property, at any depth, that has no description."""
    if isinstance(schema, list):
        return [name for item in schema for name in _undescribed(item, where)]
    if not isinstance(schema, dict):
        return []
    missing = []
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop:
            missing.append(f"{where}{name}")
        missing += _undescribed(prop, f"{where}{name}.")
    for key in ("items", "oneOf", "anyOf", "allOf"):
        missing += _undescribed(schema.get(key), where)
    return missing


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_openai_schema_describes_every_field_portably(name: str) -> None:
    tool = CLASSES[name](backend=UnusedBackend())
    spec = convert_to_openai_tool(tool)["function"]
    assert spec["name"] == name and len(spec["description"]) > 50
    assert _undescribed(spec["parameters"]) == []
    assert spec["parameters"]["required"][0] == "image"
    # No keywords that dangle once LangChain inlines $defs, or that several providers reject.
    text = json.dumps(spec)
    for keyword in ("$ref", "discriminator", "prefixItems"):
        assert keyword not in text
    # The image store is the application's: it is nowhere in what the model sees.
    assert not {"store", "images", "backend"} & set(spec["parameters"]["properties"])


def test_vqa_content_is_the_models_answer(
    tools: dict[str, BaseTool], tiny_model: MedPLIB, ct_path: str
) -> None:
    tool = tools["medical_vqa"]
    content = tool.invoke(EXAMPLES["medical_vqa"])
    expected = tiny_model.answer(ct_path, "What modality is this?", **tool.decoding).text.strip()
    assert content == (expected or "(the model gave an empty answer)")


def test_grounding_returns_a_summary_and_the_masks_as_artifact(
    tools: dict[str, BaseTool], tiny_model: MedPLIB, ct_path: str
) -> None:
    call = ToolCall(name="medical_grounding", args=EXAMPLES["medical_grounding"], id="g1", type="tool_call")
    message = tools["medical_grounding"].invoke(call)
    assert isinstance(message, ToolMessage) and message.status == "success"
    artifact = message.artifact
    assert isinstance(artifact, GroundingArtifact)
    expected = tiny_model.ground(ct_path, "the lung", **tools["medical_grounding"].decoding)
    assert artifact.result.masks == expected.masks and artifact.result.image_size == (128, 128)
    # The content: what, where, how large, how sure; one line per mask, named by its store id.
    seg = artifact.result.masks[0]
    assert artifact.mask_ids == ["mask-1"] and artifact.overlay_id == "img-2"
    assert message.content.startswith("Segmented 'the lung' in img-1 (128x128 pixels")
    line = f"- mask-1, {seg.summary}; {seg.area} pixels; box [x0, y0, x1, y1] = {list(seg.bbox)}"
    assert line in message.content
    assert f"confidence {min(max(seg.score, 0.0), 1.0):.2f}" in message.content
    assert ("forced" in message.content) == artifact.result.seg_forced
    # The store holds each mask (a 1-bit PNG a region prompt can use) and the overlay.
    images = tools["medical_grounding"].images
    stored_mask = Mask.from_png(images.get("mask-1").data)
    assert stored_mask == seg.mask
    overlay = np.asarray(Image.open(io.BytesIO(artifact.overlay_png)))
    assert overlay.shape == (128, 128, 3) and images.get("img-2").data == artifact.overlay_png
    # The artifact survives JSON (bytes as base64) for checkpointers and tracing.
    assert GroundingArtifact.model_validate_json(artifact.model_dump_json()) == artifact


def test_a_grounded_mask_is_a_region_for_the_next_question(tools: dict[str, BaseTool]) -> None:
    tools["medical_grounding"].invoke({"image": "img-1", "target": "the heart"})
    regions = [{"kind": "mask", "mask": "mask-1"}]
    args = {"image": "img-1", "question": "What is in {region}?", "regions": regions}
    call = ToolCall(name="medical_region_vqa", args=args, id="r1", type="tool_call")
    message = tools["medical_region_vqa"].invoke(call)
    assert message.status == "success" and message.content


def test_every_region_kind_is_accepted(
    tools: dict[str, BaseTool], memory_uri: Callable[[bytes, str], str]
) -> None:
    square = np.zeros((128, 128), dtype=bool)
    square[40:80, 40:80] = True

    regions = [
        {"kind": "point", "points": [[64, 64], [70, 64]], "labels": [1, 0], "radius": 6},
        {"kind": "box", "box": [10, 10, 40, 40]},
        {"kind": "polygon", "points": [[10, 100], [60, 100], [30, 120]]},
        {"kind": "scribble", "points": [[80, 20], [120, 40]], "width": 4},
        {"kind": "mask", "mask": memory_uri(encode_png(square), "square.png")},
    ]
    args = {"image": "img-1", "question": "Compare these regions.", "regions": regions}
    call = ToolCall(name="medical_region_vqa", args=args, id="r", type="tool_call")
    message = tools["medical_region_vqa"].invoke(call)
    assert message.status == "success", message.content
