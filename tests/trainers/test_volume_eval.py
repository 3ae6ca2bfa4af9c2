"""The MNI152 test slabs of the embedded dataset, and `medplib eval`'s volume metrics on them (tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medplib.core.assistant import load
from medplib.core.errors import InvalidInputError
from medplib.core.io import load_volume
from medplib.core.io.registry_data import mni152_file
from medplib.trainers.data.sources.mni152 import SPLIT
from medplib.trainers.data.volumes import VOLUMES_FOLDER, volume_samples, write_mni152_test_volumes
from medplib.trainers.eval.eval_markdown import format_report
from medplib.trainers.eval.volumes import evaluate_volumes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slabs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    write_mni152_test_volumes(root)
    return root


def test_slabs_are_the_test_split_on_the_template_s_world_grid(slabs: Path) -> None:
    samples = volume_samples(slabs, "test")
    assert {s.axis for s in samples} == {"axial", "coronal"}
    assert {s.structure for s in samples} == {
        "grey_matter",
        "white_matter",
        "left_hemisphere",
        "right_hemisphere",
    }
    template = nib.load(mni152_file("t1"))
    grey = np.asarray(nib.load(mni152_file("grey_matter")).dataobj) > 127
    for sample in (s for s in samples if s.structure == "grey_matter"):
        slab = nib.load(slabs / sample.volume)
        mask = np.asarray(nib.load(slabs / sample.mask).dataobj) > 0
        axis = ("sagittal", "coronal", "axial").index(sample.axis)
        # The slab's first voxel lies where the template's voxel `start` does, and holds its value.
        start = round(float(np.linalg.solve(template.affine, slab.affine @ [0, 0, 0, 1])[axis]))
        take = [slice(None)] * 3
        take[axis] = slice(start, start + slab.shape[axis])
        np.testing.assert_array_equal(np.asarray(slab.dataobj), np.asarray(template.dataobj)[tuple(take)])
        np.testing.assert_array_equal(mask, grey[tuple(take)])
        assert all(SPLIT.split_of(i) == "test" for i in range(start, start + slab.shape[axis]))


def test_volume_samples_must_stay_inside_the_dataset(tmp_path: Path) -> None:
    assert volume_samples(tmp_path, "test") == []
    (tmp_path / VOLUMES_FOLDER).mkdir()
    escaping = {
        "id": "x",
        "volume": "../x.nii.gz",
        "mask": "m.nii.gz",
        "structure": "s",
        "text": "t",
        "axis": "axial",
    }
    (tmp_path / VOLUMES_FOLDER / "test.json").write_text(json.dumps([escaping]))
    with pytest.raises(InvalidInputError, match=r"\.\./x\.nii\.gz is not a file inside the dataset"):
        volume_samples(tmp_path, "test")


def test_eval_scores_volume_dice_and_millilitres(slabs: Path) -> None:
    samples = volume_samples(slabs, "test")
    first = [s for s in samples if s.volume == samples[0].volume][:2]  # one slab, two structures: fast
    (slabs / VOLUMES_FOLDER / "test.json").write_text(json.dumps([s.model_dump() for s in first]))
    model = load("tiny", device="cpu").model
    volumes = evaluate_volumes(model, slabs, "test", name="tiny", max_new_tokens=1)
    assert volumes["count"] == 2 and set(volumes["by_structure"]) == {s.structure for s in first}
    row = volumes["samples"][0]
    truth = np.asarray(nib.load(slabs / first[0].mask).dataobj) > 0
    assert row["true_ml"] == pytest.approx(truth.sum() / 1000, abs=1e-3)  # 1 mm voxels
    assert row["error_ml"] == pytest.approx(row["predicted_ml"] - row["true_ml"], abs=2e-3)
    assert 0 <= row["dice"] <= 1 and row["slices"] == load_volume(slabs / first[0].volume).shape[2]
    report = format_report(
        {
            "setup": {"model": "tiny", "data": "d", "split": "test", "model_kind": "preset",
                      "untrained": True,
                      "samples_scored": 0, "samples_in_split": 0, "malformed_samples_skipped": 0,
                      "max_new_tokens": 1, "device": "cpu", "seconds": 1},
            "metrics": {"counts": {"closed": 0, "open": 0, "region": 0, "grounding": 0}, "parts": {},
                        "by_kind": {}, "volumes": volumes},
            "baselines": {}, "gallery": [],
        }
    )  # fmt: skip
    assert "## Volumes" in report and "volume Dice" in report
