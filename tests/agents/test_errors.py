"""Every way a tool call goes wrong ends as a message an agent can act on, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import ValidationError

from medplib.agents import ImageStore, MedPLIBToolkit
from medplib.core.assistant import MedPLIB
from medplib.core.errors import InvalidInputError
from medplib.core.hookspecs import hookimpl

BOX = {"kind": "box", "box": [32, 32, 96, 96]}


def call(tool: BaseTool, **args: Any) -> ToolMessage:
    """What an agent's ToolNode gets back: a ToolMessage, `status='error'` when the call failed."""
    return tool.invoke(ToolCall(name=tool.name, args=args, id="call-1", type="tool_call"))


def refused(message: ToolMessage, *fragments: str) -> bool:
    return message.status == "error" and all(fragment in message.content for fragment in fragments)


# ---- images -----------------------------------------------------------------------------------------


def test_an_unknown_image_id_names_the_ids_there_are(tools: dict[str, BaseTool]) -> None:
    message = call(tools["medical_vqa"], image="img-7", question="What is this?")
    assert refused(message, "unknown image id 'img-7': the image store holds img-1")


def test_a_long_store_is_listed_shortened(tools: dict[str, BaseTool]) -> None:
    images = tools["medical_vqa"].images
    for _ in range(30):
        images.put(b"\x89PNG", prefix="mask")
    message = call(tools["medical_vqa"], image="mask-99", question="?")
    assert refused(message, "img-1, mask-1", "...", "mask-30 (31 in all)")


def test_a_broken_image_is_named(tools: dict[str, BaseTool]) -> None:
    broken = tools["medical_vqa"].images.put(b"this is not an image")
    message = call(tools["medical_vqa"], image=broken, question="What is this?")
    assert refused(message, "not a recognised image format")


def test_a_missing_file_is_named(tools: dict[str, BaseTool]) -> None:
    message = call(tools["medical_grounding"], image="/no/such/scan.png", target="the liver")
    assert refused(message, "no such file: /no/such/scan.png")


def test_the_store_can_limit_the_paths_an_agent_names(make_toolkit: Callable[..., MedPLIBToolkit]) -> None:
    toolkit = make_toolkit(images=ImageStore(allowed_prefixes=["memory://scans/"]))
    vqa = toolkit.get_tools()[0]
    assert refused(call(vqa, image="/etc/passwd", question="?"), "limited to: memory://scans/")
    assert call(vqa, image="img-1", question="What is this?").status == "success"
    strict = make_toolkit(images=ImageStore(allowed_prefixes=()))
    message = call(strict.get_tools()[0], image="memory://scans/a.png", question="?")
    assert refused(message, "limited to: none: use an id from the image store")


# ---- arguments and regions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            {"image": "img-1", "question": "?", "regions": [{"kind": "box", "box": [60, 10, 50, 50]}]},
            "x0 < x1",
        ),
        ({"image": "img-1", "question": "?", "regions": [{"kind": "blob"}]}, "kind must be one of"),
        (
            {"image": "img-1", "question": "?", "regions": [{"kind": "box", "box": [1, 2]}]},
            "regions.0.box.box",
        ),
        ({"image": "img-1", "question": "?", "regions": []}, "regions: List should have at least 1 item"),
        ({"image": "img-1", "regions": [BOX]}, "question: Field required"),
        ({"image": "img-1", "question": "?", "regions": [BOX], "model": "x"}, "model: Extra inputs"),
        (
            {
                "image": "img-1",
                "question": "?",
                "regions": [{"kind": "point", "points": [[5, 5]], "labels": [0]}],
            },
            "only negative points",
        ),
    ],
)
def test_arguments_that_do_not_fit_the_schema(
    tools: dict[str, BaseTool], args: dict[str, Any], fragment: str
) -> None:
    message = call(tools["medical_region_vqa"], **args)
    assert refused(message, "invalid arguments: ", fragment), message.content


def test_a_box_outside_the_image_gives_the_image_size(tools: dict[str, BaseTool]) -> None:
    regions = [{"kind": "box", "box": [10, 10, 500, 50]}]
    message = call(
        tools["medical_region_vqa"], image="img-1", question="What is in {region}?", regions=regions
    )
    assert refused(message, "outside the 128x128 (WxH) image", "x must be within 0..128")


def test_placeholders_must_match_the_regions(tools: dict[str, BaseTool]) -> None:
    message = call(
        tools["medical_region_vqa"], image="img-1", question="{region} or {region}?", regions=[BOX]
    )
    assert refused(message, "marks 2 region(s) with {region} but 1 region prompt(s)")


def test_an_unknown_mask_id(tools: dict[str, BaseTool]) -> None:
    regions = [{"kind": "mask", "mask": "mask-3"}]
    message = call(tools["medical_region_vqa"], image="img-1", question="What is this?", regions=regions)
    assert refused(message, "unknown image id 'mask-3'")


def test_special_tokens_in_a_question_are_plain_text(
    tools: dict[str, BaseTool], tiny_model: MedPLIB, ct_path: str
) -> None:
    question = "Is there a <SEG> in <region> here </region> <image>?"
    message = call(tools["medical_vqa"], image="img-1", question=question)
    assert message.status == "success"
    direct = tiny_model.answer(ct_path, question, **tools["medical_vqa"].decoding)
    assert message.content == (direct.text.strip() or "(the model gave an empty answer)")
    assert direct.num_regions == 0 and not direct.seg_forced


def test_too_long_an_answer_is_a_capacity_error(make_toolkit: Callable[..., MedPLIBToolkit]) -> None:
    vqa = make_toolkit(decoding={"max_new_tokens": 100_000}).get_tools()[0]
    assert refused(call(vqa, image="img-1", question="?"), "over the limit of 512")


def test_bad_decoding_options_fail_when_the_toolkit_is_made(
    make_toolkit: Callable[..., MedPLIBToolkit],
) -> None:
    with pytest.raises(ValidationError, match="invalid decoding options: num_beams"):
        make_toolkit(decoding={"num_beams": 4})


def test_without_error_handling_errors_raise(make_toolkit: Callable[..., MedPLIBToolkit]) -> None:
    vqa, region_vqa, _ = make_toolkit(handle_tool_error=False).get_tools()[:3]
    with pytest.raises(ToolException, match="unknown image id 'img-2'"):
        vqa.invoke({"image": "img-2", "question": "?"})
    with pytest.raises(ValidationError, match="x0 < x1"):
        region_vqa.invoke(
            {"image": "img-1", "question": "?", "regions": [{"kind": "box", "box": [9, 0, 1, 1]}]}
        )


async def test_async_calls_fail_the_same_way(tools: dict[str, BaseTool]) -> None:
    tool = tools["medical_grounding"]
    message = await tool.ainvoke(
        ToolCall(name=tool.name, args={"image": "img-5", "target": "x"}, id="a", type="tool_call")
    )
    assert refused(message, "unknown image id 'img-5'")


# ---- the before-call hook ---------------------------------------------------------------------------


class Audit:
    """Logs every call, and refuses those about one image (a policy: it is not de-identified)."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse = refuse

    @hookimpl
    def medplib_before_tool_call(self, tool_name: str, arguments: dict[str, Any]) -> None:
        self.calls.append((tool_name, dict(arguments)))
        if arguments["image"] == self.refuse:
            raise InvalidInputError(f"image {self.refuse} is not de-identified")


class Rewrite:
    """Edits the arguments in place: points every call at another image (or breaks them)."""

    def __init__(self, **changes: Any) -> None:
        self.changes = changes

    @hookimpl
    def medplib_before_tool_call(self, tool_name: str, arguments: dict[str, Any]) -> None:
        arguments.update(self.changes)


def test_the_hook_sees_every_call_as_the_model_made_it(
    tools: dict[str, BaseTool], register_plugin: Any
) -> None:
    audit = Audit()
    register_plugin(audit, "audit")
    call(tools["medical_region_vqa"], image="img-1", question="What is in {region}?", regions=[BOX])
    call(tools["medical_grounding"], image="img-1", target="the lung")
    assert audit.calls == [
        ("medical_region_vqa", {"image": "img-1", "question": "What is in {region}?", "regions": [BOX]}),
        ("medical_grounding", {"image": "img-1", "target": "the lung", "overlay": False}),
    ]


def test_the_hook_may_refuse_a_call(tools: dict[str, BaseTool], register_plugin: Any) -> None:
    register_plugin(Audit(refuse="img-1"), "policy")
    message = call(tools["medical_vqa"], image="img-1", question="What is this?")
    assert refused(message, "medical_vqa was refused: image img-1 is not de-identified")


def test_the_hook_may_edit_the_arguments(
    tools: dict[str, BaseTool], register_plugin: Any, mr_path: str
) -> None:
    tool = tools["medical_grounding"]
    assert tool.images.put(mr_path) == "img-2"
    register_plugin(Rewrite(image="img-2"), "rewrite")
    message = call(tool, image="img-1", target="the brain")
    assert message.status == "success" and message.artifact.result.image_size == (64, 64)


def test_arguments_a_plugin_broke_are_refused(tools: dict[str, BaseTool], register_plugin: Any) -> None:
    register_plugin(Rewrite(question=""), "breaker")
    message = call(tools["medical_vqa"], image="img-1", question="What is this?")
    assert refused(message, "a plugin left invalid arguments: question: String should have at least 1")
