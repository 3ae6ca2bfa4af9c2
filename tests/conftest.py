"""Shared fixtures: real medical files that ship inside installed packages, fsspec memory URIs, plugins."""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from medplib.core import plugins
from medplib.trainers import registry_data


@pytest.fixture(scope="session")
def dicom_file() -> Callable[[str], Path]:
    """A DICOM test file of pydicom or pydicom-data by its full name, e.g. 'CT_small.dcm'; never downloads."""
    return registry_data.dicom_file


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    """The MNI152 2009a T1 template, 197x233x189 uint8 at 1 mm, as nilearn ships it (.nii.gz)."""
    return registry_data.mni152_file("t1")


@pytest.fixture(scope="session")
def mni_gm_path() -> Path:
    """The grey-matter probability map (uint8, p = value / 255) on the same grid as the T1 template."""
    return registry_data.mni152_file("grey_matter")


@pytest.fixture
def memory_uri() -> Iterator[Callable[[bytes, str], str]]:
    """Write bytes into fsspec's memory filesystem and return their memory:// URI; removed after."""
    fs = fsspec.filesystem("memory")
    folder = f"/medplib-tests/{uuid.uuid4().hex}"
    written: list[str] = []

    def write(data: bytes, name: str) -> str:
        path = f"{folder}/{name}"
        fs.pipe(path, data)
        written.append(path)
        return f"memory://{path}"

    yield write
    for path in written:
        fs.rm(path)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (empty) data never delivers: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def png_claiming() -> Callable[[int, int], bytes]:
    """Makes a PNG whose header claims (width, height) but holds no pixels."""
    return _png_claiming


@pytest.fixture
def register_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[object, str], bool]]:
    """Register throw-away plugins with medplib's plugin manager (as llm's tests do); gone after the test."""
    plugins.load_plugins()
    monkeypatch.setattr(plugins, "_load_problems", list(plugins._load_problems))
    monkeypatch.setattr(plugins, "_sources", dict(plugins._sources))
    registered: list[tuple[object, str]] = []

    def register(plugin: object, name: str) -> bool:
        registered.append((plugin, name))
        return plugins.register_plugin(plugin, name)

    yield register
    for plugin, name in registered:
        if plugins.pm.get_plugin(name) is plugin:
            plugins.pm.unregister(plugin)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: on tiny tensors a second OpenMP thread only adds
    synchronisation, which costs ten times the work on a busy 2-CPU machine."""
    import torch  # deferred: most tests never need torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage IV checkpoint of the tiny preset: the built-in experts composed, router and expert
    weights random (fresh experts equal the trunk, so a load that skipped them would go unnoticed)."""
    import torch  # deferred: most tests never need torch

    from medplib.core.model import build_medplib
    from medplib.router import compose

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moe = compose(build_medplib("tiny"), ["vision_language", "pixel_grounding"])
        with torch.no_grad():
            for weight in moe.routed_state_dict().values():
                weight.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("moe") / "checkpoint"
    moe.save_pretrained(folder)
    return folder
