"""Shared fixtures: real medical files that ship inside installed packages, fsspec memory URIs, plugins."""

from __future__ import annotations

import contextlib
import importlib
import random
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from medplib.core import plugins
from medplib.core.io import registry_data


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny-preset ops are too small to gain from threads, and spinning OpenMP threads stall whenever the
    shared machine's other core is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def scripted_lm_head() -> Callable[[Any, Sequence[int | Sequence[int]]], AbstractContextManager[None]]:
    """`with scripted_lm_head(model, script):` the model's LM head says `script[step]` at each decoding
    step whatever the hidden state (an int: every row; a list: one token per row), the last entry
    once the script runs out; the trained head is put back after. The trunk stays real."""
    import torch  # deferred: most tests never need torch

    class ScriptedLMHead(torch.nn.Module):
        def __init__(self, script: Sequence[int | Sequence[int]], vocab_size: int) -> None:
            super().__init__()
            self.script, self.vocab_size, self.step = list(script), vocab_size, 0

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
            said = self.script[min(self.step, len(self.script) - 1)]
            for row, token in enumerate([said] * len(hidden) if isinstance(said, int) else said):
                logits[row, ..., token] = 1.0
            self.step += 1
            return logits

    @contextlib.contextmanager
    def scripted(model: Any, script: Sequence[int | Sequence[int]]) -> Iterator[None]:
        # Swapped by hand: monkeypatch cannot, an nn.Module child is not in the module's `__dict__`.
        language_model = model.language_model
        original = language_model.lm_head
        language_model.lm_head = ScriptedLMHead(script, model.config.text_config.vocab_size)
        try:
            yield
        finally:
            language_model.lm_head = original

    return scripted


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


# ---- volumes with a known geometry, written by the tests ------------------------------------------------
def write_dicom_series(
    folder: Path,
    planes: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    step: float = 2.5,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-40.0, -30.0, 10.0),
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    prefix: str = "slice",
) -> list[Path]:
    """`planes` (slice, row, column) as one CT file per slice, slice k at origin + k * step * normal,
    written in shuffled order under shuffled names; returns the paths in slice order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, frame_of_reference = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    series_uid = series_uid or generate_uid()
    row_dir, column_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, column_dir)
    normal /= np.linalg.norm(normal)
    order = list(range(len(planes)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths: dict[int, Path] = {}
    for written, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Volume", "T1", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series_uid, 3, "CT"
        ds.SeriesDescription = f"{prefix} series"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array(origin) + k * step * normal]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = planes.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = (planes[k].astype(np.int16) + 1024).astype("<i2").tobytes()
        path = folder / f"{prefix}-{written:03d}-{random.Random(k).randrange(10**6):06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return [paths[k] for k in range(len(planes))]


def sphere(shape: tuple[int, int, int], centre: Sequence[float], radius: float) -> np.ndarray:
    """A boolean ball on a voxel grid (centre and radius in voxels)."""
    grid = np.indices(shape, dtype=np.float32)
    offsets = grid - np.array(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    return (offsets**2).sum(axis=0) <= radius**2


@pytest.fixture(scope="session")
def dicom_series_writer() -> Callable[..., list[Path]]:
    return write_dicom_series


@pytest.fixture(scope="session")
def make_sphere() -> Callable[..., np.ndarray]:
    return sphere


# ---- the example plugin expert (examples/medplib-expert-modality) ----------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medplib-expert-modality"
DISTRIBUTION = "medplib-expert-modality"
PACKAGE = "medplib_expert_modality"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[metadata.EntryPoint]:
    """Installed as a user would (no network: no deps, no build isolation), from a copy, so pip's
    in-tree build leaves nothing in the repository; registered in this process too."""
    try:
        metadata.distribution(DISTRIBUTION)
        installed_before = True
    except metadata.PackageNotFoundError:
        installed_before = False
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("example") / EXAMPLE.name)
    pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", str(source))
    importlib.invalidate_caches()
    (entry_point,) = metadata.entry_points(group=plugins.ENTRY_POINT_GROUP, name="modality")
    plugins.load_plugins()
    # Registered as the installed distribution, in place of whatever stood in (`example_module`'s
    # copy, registered by an earlier test of the session), which comes back after.
    standing_in, its_source = plugins.pm.get_plugin("modality"), plugins._sources.get("modality", "")
    if standing_in is not None:
        plugins.pm.unregister(standing_in)
    assert plugins.load_entry_point(entry_point)
    yield entry_point
    if plugins.pm.get_plugin("modality") is not None:
        plugins.pm.unregister(name="modality")
    if standing_in is not None:
        plugins.register_plugin(standing_in, "modality", its_source)
    if not installed_before:
        pip("uninstall", "-y", "-q", DISTRIBUTION)


@pytest.fixture(scope="session")
def example_module() -> Iterator[object]:
    """The example expert of this repository, registered in this process (no pip), for tests of the
    model and training; the pip-installed path is `example_plugin`'s. It stands in for any installed
    copy (the shared environment may hold another checkout's) while the session lasts."""
    plugins.load_plugins()
    installed = plugins.pm.get_plugin("modality")
    if installed is not None:
        plugins.pm.unregister(installed)
    cached = {name: module for name, module in sys.modules.items() if name.split(".")[0] == PACKAGE}
    for name in cached:
        del sys.modules[name]
    sys.path.insert(0, str(EXAMPLE))
    module = importlib.import_module(PACKAGE)
    assert plugins.register_plugin(module, "modality", "example")
    yield module
    if plugins.pm.is_registered(module):
        plugins.pm.unregister(module)
    sys.path.remove(str(EXAMPLE))
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]
    sys.modules.update(cached)
    if installed is not None and plugins.pm.get_plugin("modality") is None:
        plugins.pm.register(installed, name="modality")


@pytest.fixture(scope="session")
def modality_checkpoint(example_module: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint that holds the example's `modality` expert (token, rows, head): what the
    serving tests host. Its weights are random, but they are the checkpoint's own, as trained ones are."""
    import torch

    from medplib.core.expert_heads import add_expert
    from medplib.core.model import build_medplib

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_medplib("tiny")
        assert add_expert(model, plugins.get_experts()["modality"])
    folder = tmp_path_factory.mktemp("modality") / "checkpoint"
    model.save_pretrained(folder)
    return folder
