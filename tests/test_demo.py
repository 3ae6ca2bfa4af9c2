"""`make demo`'s first part: real images in, masks and overlays out (the model part: tests/trainers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medplib.core.masks import Mask
from medplib.demo import inspect_real_data


def test_demo_writes_overlays_and_rle_results(tmp_path: Path, capsys) -> None:
    results = inspect_real_data(tmp_path)
    printed = capsys.readouterr().out
    for name in ("ct_chest", "cr_chest", "mni152_t1_sagittal", "overlay_0x6000"):
        assert name in printed
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results
    lesion = Mask.model_validate(written["mr_abdomen_lesion"]["overlay_0x6000"])
    assert lesion.size == (484, 484) and lesion.area == 323
    chest_box = Mask.model_validate(written["cr_chest"]["box"])
    assert chest_box.size == (1955, 1841)
    for png in ("cr_chest_regions.png", "mni152_axial_grey_matter.png", "mr_abdomen_lesion_overlay.png"):
        overlay = np.asarray(Image.open(tmp_path / png))
        assert overlay.ndim == 3 and overlay.shape[2] == 3
    grey = np.asarray(Image.open(tmp_path / "mni152_axial_grey_matter.png"))
    assert grey.shape[:2] == (233, 197)
