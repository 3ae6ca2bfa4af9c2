"""Grounding through volumes: masks land on the structure on the input's own grid (NIfTI, DICOM SEG),
the batch path equals slice-by-slice grounding, the options, and answers over a slab.

Where geometry is the question, the masks come from a deterministic path through the same builder
the model's path uses (each slice's bright pixels, i.e. the known ball), so a wrong flip, axis or
affine anywhere shows as voxels off the ball. The tiny model (random weights) checks the plumbing.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medplib.core.assistant import MedPLIB
from medplib.core.errors import InvalidInputError
from medplib.core.io import load_volume, slice_volume
from medplib.core.io.volume import place_plane
from medplib.core.io.volume_writers import canonical_mask, dicom_seg, save_mask
from medplib.core.masks import Mask, SegmentationResult, orthogonal_views
from medplib.core.volume_grounding import SlicePlan, VolumeMaskBuilder, keep_largest_component, parse_slices
from medplib.core.volume_results import VolumeGroundingResult, compact_ranges
from medplib.loading import load

TOKENS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assistant() -> MedPLIB:
    return load("tiny", device="cpu")


def ground_bright(volume, axis: str = "axial", **options) -> VolumeGroundingResult:
    """Ground 'the ball' by thresholding each slice's image: the builder path with a known answer."""
    plan = SlicePlan.make(volume, axis, None, None)
    builder = VolumeMaskBuilder(plan, **options)
    for index in plan.indices:
        bright = plan.image(index).pixels[..., 0] > 127
        builder.add(index, [SegmentationResult(mask=Mask.from_array(bright), score=0.9)], seg_forced=False)
    return builder.finish(model="threshold", query="the ball", largest_component=False, timings_ms={})


def oblique_ball(tmp_path: Path, make_sphere, lps: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """A uint8 NIfTI with a bright ball, on an oblique affine whose voxel axes run RAS or LPS."""
    ball = make_sphere((14, 12, 10), (5.0, 7.0, 4.0), 3.3)
    angle = 0.3
    rotate = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotate @ np.diag([-1.2 if lps else 1.2, -0.9 if lps else 0.9, 2.5])
    affine[:3, 3] = (12.0, -30.0, 5.0)
    path = tmp_path / ("lps.nii.gz" if lps else "ras.nii.gz")
    nib.save(nib.Nifti1Image(np.where(ball, 200, 30).astype(np.uint8), affine), path)
    return path, ball, affine


@pytest.mark.parametrize("lps", [False, True], ids=["RAS", "LPS"])
@pytest.mark.parametrize("axis", ["axial", "sagittal"])
def test_oblique_nifti_mask_lands_on_the_ball_on_the_input_grid(
    tmp_path: Path, make_sphere, lps: bool, axis: str
) -> None:
    path, ball, affine = oblique_ball(tmp_path, make_sphere, lps)
    volume = load_volume(path)
    result = ground_bright(volume, axis)
    np.testing.assert_array_equal(result.mask, ball)
    np.testing.assert_allclose(result.affine, affine, atol=1e-6)
    assert result.voxels == ball.sum()
    assert result.volume_ml == pytest.approx(ball.sum() * 1.2 * 0.9 * 2.5 / 1000, rel=1e-4)
    found = np.argwhere(ball)
    assert result.bbox.voxel_min == tuple(found.min(axis=0)) and result.bbox.voxel_max == tuple(
        found.max(axis=0)
    )
    centre = (affine @ [5.0, 7.0, 4.0, 1.0])[:3]
    assert all(
        lo < c < hi
        for lo, c, hi in zip(result.bbox.world_min_mm, centre, result.bbox.world_max_mm, strict=True)
    )

    out = tmp_path / "mask.nii.gz"
    save_mask(out, result, volume)
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, nib.load(path).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), ball.astype(np.uint8))
    assert written.header.get_qform(coded=True)[1] == 2 and written.header.get_sform(coded=True)[1] == 2
    np.testing.assert_array_equal(canonical_mask(result, volume), volume.data > 127)
    views = orthogonal_views(volume, result, height=64)
    assert views.shape[0] == 64 and views.dtype == np.uint8


def test_dicom_seg_references_each_frame_s_slice(tmp_path: Path, dicom_series_writer, make_sphere) -> None:
    import highdicom as hd
    import pydicom

    ball = make_sphere((9, 20, 16), (4, 8, 9), 2.6)  # slices 2..6 hold the ball
    planes = np.where(ball, 400, -100).astype(np.int16)
    paths = dicom_series_writer(tmp_path / "ct", planes, orientation=(0.94, 0.34, 0, -0.34, 0.94, 0))
    volume = load_volume(tmp_path / "ct")
    result = ground_bright(volume)
    np.testing.assert_array_equal(result.mask.transpose(2, 1, 0), ball)

    save_mask(tmp_path / "seg.dcm", result, volume)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    slice_of = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    frames = seg.pixel_array
    referenced = []
    for frame, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[uid]
        referenced.append(k)
        np.testing.assert_array_equal(frames[frame].astype(bool), ball[k])  # the frame is its slice
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[k].ImagePositionPatient], atol=1e-3)
    assert sorted(referenced) == [k for k in range(9) if ball[k].any()]
    assert seg.SegmentSequence[0].SegmentLabel == "the ball"


def test_dicom_seg_needs_a_dicom_series(tmp_path: Path, make_sphere) -> None:
    path, _, _ = oblique_ball(tmp_path, make_sphere, lps=False)
    volume = load_volume(path)
    with pytest.raises(
        InvalidInputError, match=r"is not one \(a folder of DICOM slices\): write the mask as \.nii\.gz"
    ):
        dicom_seg(ground_bright(volume), volume)
    with pytest.raises(InvalidInputError, match=r"\.nii\.gz, \.nii or \.dcm"):
        save_mask(tmp_path / "mask.png", ground_bright(volume), volume)


def test_ground_volume_equals_grounding_each_slice(assistant: MedPLIB, tmp_path: Path, make_sphere) -> None:
    path, ball, affine = oblique_ball(tmp_path, make_sphere, lps=True)
    volume = load_volume(path)
    assistant.clear_cache()
    entries = len(assistant.cache)
    calls: list[tuple[int, int]] = []
    result = assistant.ground_volume(
        path,
        "the ball",
        axis="coronal",
        slices="2:7",
        batch_size=3,
        max_new_tokens=TOKENS,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(3, 5), (5, 5)]
    assert len(assistant.cache) == entries  # the slices' embeddings were streamed, not kept
    expected = np.zeros(volume.shape, dtype=bool)
    for index in range(2, 7):
        single = assistant.ground(
            slice_volume(volume, axis="coronal", index=index), "the ball", max_new_tokens=TOKENS
        )
        plane = np.logical_or.reduce([m.mask.to_array() for m in single.masks])
        place_plane(expected, plane, axis="coronal", index=index)
        row = result.slices[index - 2]
        assert row.index == index and row.seg_forced == single.seg_forced
        assert row.score == pytest.approx(max(m.score for m in single.masks), abs=1e-3)
    np.testing.assert_array_equal(canonical_mask(result, volume), expected)
    np.testing.assert_allclose(result.affine, affine, atol=1e-6)
    assert result.shape == ball.shape and result.mask.shape == ball.shape
    summary = VolumeGroundingResult.model_validate_json(result.model_dump_json())
    assert summary.mask is None and summary.volume_ml == result.volume_ml
    assert "mask" not in result.model_dump()

    kept = assistant.ground_volume(
        volume, "the ball", axis="coronal", slices="2:4", keep_embeddings=True, max_new_tokens=TOKENS
    )
    assert len(assistant.cache) > entries and kept.slices[0].index == 2


def test_options_leave_slices_empty_and_keep_the_largest_part(tmp_path: Path, make_sphere) -> None:
    path, _, _ = oblique_ball(tmp_path, make_sphere, lps=False)
    volume = load_volume(path)
    plan = SlicePlan.make(volume, "axial", None, None)
    builder = VolumeMaskBuilder(plan, min_score=0.5, skip_forced=True)
    full = np.ones(volume.shape[:2][::-1], dtype=bool)
    for index in plan.indices:  # score and forcing vary per slice
        mask = SegmentationResult(mask=Mask.from_array(full), score=0.2 if index == 1 else 0.8)
        builder.add(index, [mask], seg_forced=index == 2)
    result = builder.finish(model="m", query="q", largest_component=False, timings_ms={})
    kept = {s.index: s.kept for s in result.slices}
    assert (kept[0], kept[1], kept[2], kept[3]) == (True, False, False, True)
    assert [s.pixels > 0 for s in result.slices[:4]] == [True, False, False, True]

    two = np.zeros((6, 6, 6), dtype=bool)
    two[0:2, 0:2, 0:2] = True
    two[4:6, 3:6, 3:6] = True
    np.testing.assert_array_equal(keep_largest_component(two), two & (np.indices(two.shape)[0] >= 4))
    diagonal = np.zeros((3, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # corner neighbours: one 26-connected part
    np.testing.assert_array_equal(keep_largest_component(diagonal), diagonal)


def test_slice_ranges_are_checked() -> None:
    assert parse_slices("40:43", 100) == [40, 41, 42]
    assert parse_slices(":3", 10) == [0, 1, 2] and parse_slices("-2:", 10) == [8, 9]
    assert parse_slices("7", 10) == [7] and parse_slices(None, 3) == [0, 1, 2]
    with pytest.raises(InvalidInputError, match="outside the axis's 10 slices"):
        parse_slices("5:99", 10)
    with pytest.raises(InvalidInputError, match="select none"):
        parse_slices("5:5", 10)
    with pytest.raises(InvalidInputError, match="not START:STOP"):
        parse_slices("a:b", 10)
    with pytest.raises(InvalidInputError, match="slice 10 is out of range"):
        parse_slices([1, 10], 10)
    assert compact_ranges([9, 3, 4, 5]) == "3-5, 9"


def test_answer_volume_groups_the_slices_by_answer(assistant: MedPLIB, tmp_path: Path, make_sphere) -> None:
    path, _, _ = oblique_ball(tmp_path, make_sphere, lps=False)
    result = assistant.answer_volume(
        path, "Is there a ball?", slices="3:7", batch_size=2, max_new_tokens=TOKENS
    )
    assert [s.index for s in result.slices] == [3, 4, 5, 6]
    assert sorted(i for indices in result.by_answer.values() for i in indices) == [3, 4, 5, 6]
    single = assistant.answer(
        slice_volume(load_volume(path), axis="axial", index=5), "Is there a ball?", max_new_tokens=TOKENS
    )
    assert result.slices[2].text == single.text.strip()
    assert "slices" in result.summary()


def test_a_real_ct_series_grounded_by_the_model_gives_a_seg_on_its_slices(
    assistant: MedPLIB, tmp_path: Path
) -> None:
    import highdicom as hd
    import pydicom
    from pydicom import data as pydicom_data

    folder = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    volume = load_volume(folder)
    result = assistant.ground_volume(volume, "the heart", max_new_tokens=TOKENS)
    save_mask(tmp_path / "heart.dcm", result, volume)
    seg = hd.seg.segread(tmp_path / "heart.dcm")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.meta.slice_files]
    for frame, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uids.index(uid)
        np.testing.assert_array_equal(seg.pixel_array[frame].astype(bool), result.mask[:, :, k].T)
    assert seg.number_of_frames == sum(result.mask[:, :, k].any() for k in range(len(uids)))
