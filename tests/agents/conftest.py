"""Shared by the agent tests: one tiny model per session, real scans, toolkits around them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import medplib
from medplib.agents import MedPLIBToolkit
from medplib.core.assistant import MedPLIB
from medplib.core.io.registry_data import dicom_file

TOKENS = 3  # new tokens per answer: the tiny model's answers are noise, and two cores are shared


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    """Mark this folder's coroutine tests, the standard tool suites' async ones included, for asyncio.

    pytest-asyncio runs in strict mode here and langchain-tests' async tests carry no marker. The mark
    must be on the item before pytest-asyncio's own wrapper turns coroutine items into asyncio ones,
    so this wrapper runs inside it (trylast).
    """
    result = yield
    if inspect.iscoroutinefunction(obj):
        for item in result if isinstance(result, list) else [result]:
            if isinstance(item, pytest.Function):
                item.add_marker(pytest.mark.asyncio)
    return result


@pytest.fixture(scope="session")
def tiny_model() -> MedPLIB:
    return medplib.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def ct_path() -> str:
    """A real chest CT slice, 128 x 128 (pydicom's CT_small.dcm)."""
    return str(dicom_file("CT_small.dcm"))


@pytest.fixture(scope="session")
def mr_path() -> str:
    """A real MR slice, 64 x 64 (pydicom's MR_small.dcm)."""
    return str(dicom_file("MR_small.dcm"))


@pytest.fixture
def make_toolkit(tiny_model: MedPLIB, ct_path: str) -> Callable[..., MedPLIBToolkit]:
    """A fresh toolkit (and image store) on the shared model, holding the CT slice as 'img-1'."""

    def make(**fields: Any) -> MedPLIBToolkit:
        fields.setdefault("decoding", {"max_new_tokens": TOKENS})
        toolkit = MedPLIBToolkit.from_model(tiny_model, **fields)
        assert toolkit.images.put(ct_path) == "img-1"
        return toolkit

    return make


@pytest.fixture
def tools(make_toolkit: Callable[..., MedPLIBToolkit]) -> dict[str, Any]:
    """The tools of a fresh default toolkit, by name; the CT slice is 'img-1' in their store."""
    return {tool.name: tool for tool in make_toolkit().get_tools()}
