"""`medplib ground` and `ask` on volumes (tiny preset): a DICOM series folder to a DICOM SEG, a NIfTI
to a NIfTI mask on its grid, --json summaries, slab answers, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medplib.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def series(tmp_path: Path, dicom_series_writer, make_sphere) -> Path:
    ball = make_sphere((5, 16, 12), (2, 8, 6), 2.5)
    dicom_series_writer(tmp_path / "series", np.where(ball, 300, -50).astype(np.int16))
    return tmp_path / "series"


def test_series_folder_to_dicom_seg(series: Path, tmp_path: Path) -> None:
    import highdicom as hd

    out = tmp_path / "ball.dcm"
    views = tmp_path / "views.png"
    args = [
        "ground",
        str(series),
        "the ball",
        "--out",
        str(out),
        "--overlay",
        str(views),
        "--max-new-tokens",
        "1",
    ]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and "mL" in result.output and f"wrote {out}" in result.output
    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "the ball"
    assert views.stat().st_size > 0


def test_nifti_slab_to_nifti_mask_and_json(tmp_path: Path, make_sphere) -> None:
    affine = np.array([[0, 0, -2.0, 30], [-0.9, 0, 0, 12], [0, 1.1, 0, -5], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(
        nib.Nifti1Image(np.where(make_sphere((8, 10, 6), (4, 5, 3), 2), 200, 10).astype(np.uint8), affine),
        path,
    )
    out = tmp_path / "mask.nii"
    args = [
        "ground",
        str(path),
        "the ball",
        "--slices",
        "1:4",
        "--axis",
        "coronal",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, [*args, "--max-new-tokens", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["task"] == "ground_volume" and summary["axis"] == "coronal" and "mask" not in summary
    assert [s["index"] for s in summary["slices"]] == [1, 2, 3]
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == (8, 10, 6) and int(np.asarray(written.dataobj).sum()) == summary["voxels"]


def test_ask_over_a_slab(series: Path) -> None:
    result = runner.invoke(
        app, ["ask", str(series), "Is there a ball?", "--slices", "1:3", "--max-new-tokens", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "over 2 axial slices" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slices", "2:99"], "slices end 99 is outside the axis's 5 slices"),
        (["--slice", "2"], "--slice: not for a volume request"),
        (["--out", "x.png"], r"x.png: write the mask as .nii.gz, .nii or .dcm"),
    ],
)
def test_volume_errors_are_one_line(series: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["ground", str(series), "the ball", "--max-new-tokens", "1", *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
