"""The toolkit, its image store, the backend seam, plugin tools, and a cheap `import medplib.agents`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from langchain_core.tools import BaseTool, tool
from PIL import Image

from medplib.agents import (
    Backend,
    ImageStore,
    InProcessBackend,
    MedicalGroundingTool,
    MedicalRegionVQATool,
    MedicalVQATool,
    MedPLIBToolkit,
    StoredImage,
)
from medplib.core.assistant import MedPLIB
from medplib.core.errors import InvalidInputError
from medplib.core.hookspecs import hookimpl
from medplib.core.io import load_image


def test_from_model_builds_the_three_tools_on_one_backend_and_store(tiny_model: MedPLIB) -> None:
    toolkit = MedPLIBToolkit.from_model(tiny_model, decoding={"max_new_tokens": 2})
    assert isinstance(toolkit.backend, InProcessBackend) and isinstance(toolkit.backend, Backend)
    tools = toolkit.get_tools()
    assert [type(t) for t in tools[:3]] == [MedicalVQATool, MedicalRegionVQATool, MedicalGroundingTool]
    assert [t.name for t in tools[:3]] == ["medical_vqa", "medical_region_vqa", "medical_grounding"]
    for built in tools[:3]:
        assert built.backend is toolkit.backend and built.images is toolkit.images
        assert built.decoding == {"max_new_tokens": 2} and built.handle_tool_error is True
    assert tools[2].response_format == "content_and_artifact" and tools[0].response_format == "content"


def test_a_backend_must_fit_the_protocol() -> None:
    with pytest.raises(ValueError, match="backend"):
        MedPLIBToolkit(backend=object())


class TestImageStore:
    def test_ids_count_per_prefix(self) -> None:
        store = ImageStore()
        ids = [store.put(b"a"), store.put(b"b", prefix="mask"), store.put(b"c")]
        assert ids == ["img-1", "mask-1", "img-2"] and store.ids() == ids and len(store) == 3
        assert "mask-1" in store and store.get("img-2") == StoredImage(b"c")

    def test_references_keep_their_options_and_are_read_when_used(self, ct_path: str) -> None:
        store = ImageStore()
        scan = store.put(ct_path, window="lung")
        assert store.resolve(scan) == StoredImage(ct_path, {"window": "lung"})
        assert store.resolve(f"  {scan} ") == store.get(scan)
        assert store.resolve("s3://bucket/x.png") == StoredImage("s3://bucket/x.png")

    def test_pictures_are_kept_as_png(self, ct_path: str) -> None:
        store = ImageStore()
        pixels = load_image(ct_path).pixels
        grey = Image.fromarray(pixels[..., 0])
        for image in (pixels, grey, load_image(ct_path)):
            stored = store.get(store.put(image))
            assert stored.data[:8] == b"\x89PNG\r\n\x1a\n" and stored.options == {}
            assert np.array_equal(load_image(stored.data).pixels, pixels)

    @pytest.mark.parametrize(
        ("image", "options", "fragment"),
        [
            (12, {}, "cannot store int"),
            (np.zeros((4, 4, 3), np.uint8), {"frame": 2}, "frame"),
            (np.zeros((4, 4, 3), np.uint8), {"colour": "red"}, "invalid image options"),
        ],
    )
    def test_what_cannot_be_stored(self, image: Any, options: dict[str, Any], fragment: str) -> None:
        with pytest.raises(InvalidInputError, match=fragment):
            ImageStore().put(image, **options)

    def test_allowed_prefixes_are_roots_a_path_cannot_leave(self, tmp_path: Any) -> None:
        (tmp_path / "data").mkdir()
        (tmp_path / "data/link").symlink_to("/etc")
        store = ImageStore(allowed_prefixes=[str(tmp_path / "data"), "s3://scans"])
        for escape in (
            f"{tmp_path}/data/../etc/passwd",
            f"{tmp_path}/data/link/passwd",
            f"{tmp_path}/data2/x.png",
            f"{tmp_path}/data/link/passwd::file://",
            f"{tmp_path}/data/%2e%2e/x.png",
            "s3://scans-private/x.png",
            "C:\\data\\x.png",
        ):
            with pytest.raises(InvalidInputError, match="limited to"):
                store.resolve(escape)
        assert store.resolve(f"file://{tmp_path}/data/x/../a.png") == StoredImage(f"{tmp_path}/data/a.png")
        assert store.resolve("s3://scans/a.png") == StoredImage("s3://scans/a.png")

    def test_prefixes_are_lower_case_words(self) -> None:
        with pytest.raises(InvalidInputError, match="lower-case letters"):
            ImageStore().put(b"x", prefix="Img-")


class Contributes:
    """A plugin expert contributing its own tool, and (badly) one named like a built-in."""

    def __init__(self, *tools: BaseTool) -> None:
        self.tools = tools

    @hookimpl
    def medplib_register_tools(self, register: Callable[[Any], None]) -> None:
        for contributed in self.tools:
            register(contributed)


@tool
def count_cells(image: str) -> str:
    """Count the cell nuclei in a microscopy image."""
    return "42"


@tool("medical_vqa")
def fake_vqa(image: str, question: str) -> str:
    """Not the real one."""
    return "no"


def test_plugin_tools_join_the_built_ins(
    make_toolkit: Callable[..., MedPLIBToolkit], register_plugin: Any
) -> None:
    register_plugin(Contributes(count_cells, fake_vqa), "cells")
    with pytest.warns(UserWarning, match="plugin tool 'medical_vqa' skipped"):
        tools = make_toolkit().get_tools()
    assert [t.name for t in tools] == [
        "medical_vqa",
        "medical_region_vqa",
        "medical_grounding",
        "medical_volume_grounding",
        "count_cells",
    ]
    assert isinstance(tools[0], MedicalVQATool)
    assert [t.name for t in make_toolkit(include_plugin_tools=False).get_tools()] == [
        "medical_vqa",
        "medical_region_vqa",
        "medical_grounding",
        "medical_volume_grounding",
    ]


class EchoBackend:
    """Any object with the four methods is a backend: what the Ray Serve client will be."""

    def __init__(self, model: MedPLIB) -> None:
        self.inner = InProcessBackend(model)
        self.seen: list[StoredImage] = []

    def answer(self, image: StoredImage, question: str, regions: Any = (), **decoding: Any) -> Any:
        self.seen.append(image)
        return self.inner.answer(image, question, regions, **decoding)

    def ground(self, image: StoredImage, text: str, **decoding: Any) -> Any:
        self.seen.append(image)
        return self.inner.ground(image, text, **decoding)

    async def aanswer(self, *args: Any, **kwargs: Any) -> Any:
        return self.answer(*args, **kwargs)

    async def aground(self, *args: Any, **kwargs: Any) -> Any:
        return self.ground(*args, **kwargs)


def test_any_backend_of_the_protocol_serves_the_tools(tiny_model: MedPLIB, ct_path: str) -> None:
    backend = EchoBackend(tiny_model)
    toolkit = MedPLIBToolkit(backend=backend, decoding={"max_new_tokens": 2}, include_plugin_tools=False)
    scan = toolkit.images.put(ct_path, window="lung")
    vqa, _, grounding, _ = toolkit.get_tools()
    assert vqa.invoke({"image": scan, "question": "What is this?"})
    assert grounding.invoke({"image": scan, "target": "the lung"}).startswith("Segmented 'the lung' in img-1")
    assert backend.seen == [StoredImage(ct_path, {"window": "lung"})] * 2


def test_importing_medplib_agents_loads_neither_torch_nor_langchain() -> None:
    code = (
        "import sys, medplib.agents; "
        "print(sorted(m for m in ('torch', 'langchain_core') if m in sys.modules)); "
        "from medplib.agents import MedPLIBToolkit; "
        "print(sorted(m for m in ('torch', 'langchain_core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['langchain_core']"]


class RegionCounter(BaseTool):
    """A plugin's tool that needs the run's backend and image store (as the built-in tools do)."""

    name: str = "count_regions"
    description: str = "Ask the model how many regions an image shows."
    backend: Any = None
    images: Any = None

    def _run(self, image: str) -> str:
        answer = self.backend.answer(self.images.resolve(image), "How many regions?", max_new_tokens=2)
        return f"{type(self.backend).__name__}: {answer.new_tokens} tokens"


class Gatekeeper:
    """A policy plugin: records every tool call, refuses one image, rewrites another."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def medplib_before_tool_call(self, tool_name: str, arguments: dict[str, Any]) -> None:
        self.calls.append((tool_name, dict(arguments)))
        if arguments.get("image") == "img-9":
            raise InvalidInputError("img-9 is not for agents")
        if arguments.get("image") == "scan":
            arguments["image"] = "img-1"


def test_plugin_tools_get_the_runs_backend_and_the_before_tool_call_hook(
    make_toolkit: Callable[..., MedPLIBToolkit], register_plugin: Any
) -> None:
    registered = RegionCounter()
    register_plugin(Contributes(registered), "regions")
    gate = Gatekeeper()
    register_plugin(gate, "gate")
    toolkit = make_toolkit()
    counter = next(t for t in toolkit.get_tools() if t.name == "count_regions")
    assert counter.inner.backend is toolkit.backend and counter.inner.images is toolkit.images
    assert registered.backend is None  # the registered tool stays unbound: one copy per toolkit
    assert counter.invoke({"image": "scan"}) == "InProcessBackend: 2 tokens"  # rewritten to img-1
    assert gate.calls == [("count_regions", {"image": "scan"})]
    assert "img-9 is not for agents" in counter.invoke({"image": "img-9"})  # an error the agent sees
    assert counter.args == registered.args and counter.description == registered.description
