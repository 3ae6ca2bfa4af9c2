"""Shared fixtures: the real medical files that ship inside installed packages, and fsspec memory URIs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

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
