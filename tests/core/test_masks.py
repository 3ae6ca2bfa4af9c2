"""Masks: exact COCO RLE round trips, the COCO string format itself, PNG I/O, overlays and results."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pydantic
import pytest

from medplib.core.errors import InvalidInputError
from medplib.core.masks import PALETTE, Mask, SegmentationResult, overlay, read_mask, save_png

ODD_SHAPES = [(1, 1), (1, 17), (17, 1), (3, 5), (31, 7), (64, 65), (127, 255)]


def special_masks(height: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(height * 997 + width)
    single = np.zeros((height, width), bool)
    single[height // 2, width // 3] = True
    last = np.zeros((height, width), bool)
    last[-1, -1] = True
    return {
        "empty": np.zeros((height, width), bool),
        "full": np.ones((height, width), bool),
        "single": single,
        "last-pixel": last,
        "noise": rng.random((height, width)) < 0.5,
        "sparse": rng.random((height, width)) < 0.02,
        "checker": (np.indices((height, width)).sum(axis=0) % 2).astype(bool),
    }


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()


@pytest.fixture(scope="module")
def liver_mr() -> tuple[np.ndarray, np.ndarray]:
    """A real abdominal MR slice and its overlay plane (0x6000), a binary ring around a liver lesion."""
    import pydicom

    from medplib.core.io.registry_data import dicom_file

    dataset = pydicom.dcmread(dicom_file("mr_abdomen_lesion"))
    pixels = dataset.pixel_array.astype(np.float64)
    grey = np.rint(255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), dataset.overlay_array(0x6000).astype(bool)


# --- RLE -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), ODD_SHAPES)
def test_rle_round_trip_is_exact(height: int, width: int) -> None:
    for name, array in special_masks(height, width).items():
        mask = Mask.from_array(array)
        assert mask.size == (height, width), name
        np.testing.assert_array_equal(mask.to_array(), array, err_msg=name)
        assert mask.area == array.sum(), name
        again = Mask.model_validate_json(mask.model_dump_json())
        assert again == mask, name
        np.testing.assert_array_equal(again.to_array(), array, err_msg=name)


# Counts strings derived by hand from pycocotools' rleToString (maskApi.c), step by step below.
CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
TWO_BANDS = np.zeros((10, 10), bool)
TWO_BANDS[:, :5] = True
TWO_BANDS[:, 6] = True


@pytest.mark.parametrize(
    ("array", "runs", "counts"),
    [
        # Column-major 010 111 010: runs 1,1,1,3,1,1,1. From i=3 each run is sent as the delta to the
        # run two back: 3-1=2, 1-1=0, 1-3=-2 (one group: -2 & 31 = 30, +48 = 'N'), 1-1=0.
        (CROSS, [1, 1, 1, 3, 1, 1, 1], "11120N0"),
        # 100 = 4 + 3*32: group 4 with the continuation bit (36 + 48 = 'T'), then 3 ('3').
        (np.zeros((10, 10), bool), [100], "T3"),
        (np.ones((10, 10), bool), [0, 100], "0T3"),
        # 50 = 18 + 1*32 -> 'b','1'; 10 -> ':'; 10-50 = -40 -> 24|32 = 'h', then -2&31 = 30 -> 'N';
        # 30-10 = 20 needs a second group, as bit 4 of a last group would read as a sign -> 'd','0'.
        (TWO_BANDS, [0, 50, 10, 10, 30], "0b1:hNd0"),
    ],
)
def test_counts_match_cocos_string_encoding(array: np.ndarray, runs: list[int], counts: str) -> None:
    mask = Mask.from_array(array)
    assert mask.counts == counts
    assert Mask(size=array.shape, counts=runs) == mask  # uncompressed input is stored compressed
    np.testing.assert_array_equal(Mask(size=array.shape, counts=counts).to_array(), array)


def test_runs_agree_with_segment_anythings_uncompressed_rle() -> None:
    import torch
    from segment_anything.utils import amg

    for height, width in ODD_SHAPES:
        for name, array in special_masks(height, width).items():
            (rle,) = amg.mask_to_rle_pytorch(torch.from_numpy(array)[None])
            assert Mask(size=rle["size"], counts=rle["counts"]) == Mask.from_array(array), name


def test_counts_agree_with_pycocotools() -> None:
    from pycocotools import mask as mask_utils

    for height, width in ODD_SHAPES:
        for name, array in special_masks(height, width).items():
            rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))
            assert Mask.from_array(array).counts == rle["counts"].decode(), name


@pytest.mark.parametrize(
    ("size", "counts", "problem"),
    [
        ([3, 3], "11120N", "cover 8 pixels"),
        ([3, 3], [1, 1, 1, 3, 1, 1], "cover 8 pixels"),
        ([3, 3], "111 0N0", "outside the COCO alphabet"),
        ([10, 10], "0T", "truncated"),
        ([3, 3], [4, -1, 6], "must not be negative"),
        ([3, 3], [4, 2.5, 3], "list of integers"),
        ([0, 3], [], "must be positive"),
        ([100_000, 100_000], [10**10], "over the limit"),
        ([3, 3], "111N", "negative run"),
    ],
)
def test_bad_rle_is_refused(size: list[int], counts, problem: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=problem):
        Mask(size=size, counts=counts)


@pytest.mark.parametrize(
    ("box", "height", "width"), [((0, 0, 1, 1), 1, 1), ((2, 3, 5, 7), 10, 12), ((0, 4, 12, 5), 10, 12)]
)
def test_bbox_has_exclusive_ends(box: tuple[int, int, int, int], height: int, width: int) -> None:
    array = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = True
    assert Mask.from_array(array).bbox == box
    assert Mask.from_array(np.zeros((height, width), bool)).bbox is None


def test_rle_json_is_compact_for_a_blob() -> None:
    yy, xx = np.mgrid[:256, :256]
    blob = (xx - 100) ** 2 + (yy - 140) ** 2 <= 50**2
    text = Mask.from_array(blob).model_dump_json()
    assert len(text) < blob.size / 100
    assert json.loads(text)["size"] == [256, 256]


def test_from_array_refuses_what_is_not_a_mask() -> None:
    with pytest.raises(InvalidInputError, match="threshold it first"):
        Mask.from_array(np.full((4, 4), 0.7))
    with pytest.raises(InvalidInputError, match="2-D"):
        Mask.from_array(np.zeros((4, 4, 3), bool))
    with pytest.raises(InvalidInputError, match="non-empty"):
        Mask.from_array(np.zeros((0, 4), bool))
    assert Mask.from_array(np.array([[0, 3], [0, 0]], np.uint8)).area == 1  # integer: non-zero is foreground


# --- PNG -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), ODD_SHAPES)
def test_png_round_trip(height: int, width: int) -> None:
    for name, array in special_masks(height, width).items():
        mask = Mask.from_array(array)
        assert Mask.from_png(mask.to_png_bytes()) == mask, name


def test_save_png_to_memory_and_disk(memory_fs, tmp_path) -> None:
    array = special_masks(31, 7)["noise"]
    save_png(array, "memory://out/mask.png")
    assert Mask.from_png("memory://out/mask.png") == Mask.from_array(array)
    save_png(array, tmp_path / "new" / "mask.png")  # fsspec creates missing parent folders
    np.testing.assert_array_equal(read_mask(tmp_path / "new" / "mask.png"), array)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    save_png(rgb, "memory://out/rgb.png")
    assert memory_fs.cat("/out/rgb.png").startswith(b"\x89PNG")


def test_png_errors(tmp_path) -> None:
    data = Mask.from_array(special_masks(64, 65)["noise"]).to_png_bytes()
    with pytest.raises(InvalidInputError, match="truncated or corrupt PNG"):
        Mask.from_png(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="no such file"):
        Mask.from_png(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="PNG output takes"):
        save_png(np.zeros((4, 4), np.float32), tmp_path / "x.png")
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(InvalidInputError, match="cannot write"):
        save_png(np.zeros((4, 4), bool), tmp_path / "a-file" / "x.png")


# --- overlay -------------------------------------------------------------------------------------------


def test_overlay_blends_fill_and_draws_contour() -> None:
    image = np.full((20, 30, 3), 100, np.uint8)
    square = np.zeros((20, 30), bool)
    square[5:15, 5:15] = True
    out = overlay(image, [square], colors=[(255, 0, 0)], alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[~square], image[~square])  # nothing outside the mask changes
    np.testing.assert_array_equal(out[10, 10], [178, 50, 50])  # interior: half image, half colour
    for y, x in [(5, 5), (5, 10), (14, 14), (10, 5)]:  # the 1-px outline is the pure colour
        np.testing.assert_array_equal(out[y, x], [255, 0, 0])
    np.testing.assert_array_equal(out[6, 6], [178, 50, 50])  # one pixel in is fill again
    plain = overlay(image, [Mask.from_array(square)], colors=[(255, 0, 0)], alpha=0.5, contour=False)
    np.testing.assert_array_equal(plain[5, 5], [178, 50, 50])


def test_overlay_gives_each_mask_its_own_colour() -> None:
    image = np.zeros((10, 40, 3), np.uint8)
    masks = []
    for k in range(4):
        m = np.zeros((10, 40), bool)
        m[:, 10 * k : 10 * k + 10] = True
        masks.append(m)
    out = overlay(image, masks, alpha=1.0)
    colours = {tuple(out[5, 10 * k + 5]) for k in range(4)}
    assert colours == set(PALETTE[:4])


def test_overlay_errors() -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(InvalidInputError, match=r"mask 1 is 12x11 \(WxH\) but the image is 12x10"):
        overlay(image, [np.zeros((10, 12), bool), np.zeros((11, 12), bool)])
    with pytest.raises(InvalidInputError, match="uint8 \\(H, W, 3\\)"):
        overlay(image[..., 0], [])
    with pytest.raises(InvalidInputError, match="alpha"):
        overlay(image, [], alpha=1.5)
    with pytest.raises(InvalidInputError, match="at least one colour"):
        overlay(image, [np.ones((10, 12), bool)], colors=[])


# --- results -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "where"),
    [
        ((0, 0, 10, 10), "upper left"),
        ((45, 45, 55, 55), "centre"),
        ((80, 40, 100, 60), "middle right"),
        ((40, 90, 60, 100), "lower centre"),
    ],
)
def test_segmentation_result_summary(box: tuple[int, int, int, int], where: str) -> None:
    array = np.zeros((100, 100), bool)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = True
    result = SegmentationResult(mask=Mask.from_array(array), label="lesion", score=0.9)
    assert result.summary == f"lesion: {100 * (x1 - x0) * (y1 - y0) / 1e4:.1f}% of the image, {where}"
    assert result.area == array.sum() and result.bbox == box
    data = json.loads(result.model_dump_json())
    assert data["area"] == result.area and data["bbox"] == list(box) and data["summary"] == result.summary
    assert SegmentationResult.model_validate_json(result.model_dump_json()) == result


def test_summary_of_tiny_and_empty_masks() -> None:
    tiny = np.zeros((100, 100), bool)
    tiny[0, 99] = True
    assert SegmentationResult(mask=Mask.from_array(tiny)).summary == "<0.1% of the image, upper right"
    empty = SegmentationResult(mask=Mask.from_array(np.zeros((4, 4), bool)))
    assert (empty.summary, empty.area, empty.bbox) == ("empty mask", 0, None)


# --- real data -----------------------------------------------------------------------------------------


def test_real_mr_overlay_round_trips_and_overlays(liver_mr: tuple[np.ndarray, np.ndarray]) -> None:
    image, ring = liver_mr
    assert ring.shape == image.shape[:2] and 0 < ring.sum() < ring.size // 100
    mask = Mask.from_array(ring)
    np.testing.assert_array_equal(mask.to_array(), ring)
    assert Mask.model_validate_json(mask.model_dump_json()) == mask
    assert Mask.from_png(mask.to_png_bytes()) == mask
    assert len(mask.counts) < 1000  # a thin ring in a 484x484 image: a few hundred characters at most
    out = overlay(image, [mask])
    changed = (out != image).any(axis=2)
    assert changed.any() and not (changed & ~ring).any()
    result = SegmentationResult(mask=mask, label="lesion outline")
    assert result.area == int(ring.sum()) and "of the image" in result.summary


def _encode_counts_one_run_at_a_time(runs: list[int]) -> str:
    """pycocotools' rleToString loop, written out: what the vectorised encoder must reproduce."""
    chars = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def test_the_vectorised_rle_encoder_equals_cocos_loop() -> None:
    from medplib.core.masks import _decode_counts, _encode_counts, _runs

    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = rng.integers(1, 120, 2)
        mask = rng.random((height, width)) < rng.random()  # noisy: many short runs, deltas of both signs
        if trial % 3 == 0:  # a blob: few long runs
            mask = np.zeros((height, width), bool)
            mask[height // 4 : height // 2, width // 3 : width // 2] = True
        runs = _runs(mask)
        assert _encode_counts(runs) == _encode_counts_one_run_at_a_time(runs)
        assert _decode_counts(_encode_counts(runs)) == runs
    for runs in ([0], [7], [0, 1_000_000, 3], [2**31, 1, 2**31 - 7, 0, 12_345_678_901]):
        assert _encode_counts(runs) == _encode_counts_one_run_at_a_time(runs)
    assert _encode_counts([]) == ""


def _decode_counts_one_char_at_a_time(counts: str) -> list[int]:
    """pycocotools' rleFrString loop, written out: what the vectorised decoder must reproduce."""
    runs: list[int] = []
    x = shift = 0
    for ch in counts:
        c = ord(ch) - 48
        x |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << shift
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
        x = shift = 0
    return runs


def test_the_vectorised_rle_decoder_equals_cocos_loop_and_refuses_what_it_cannot_hold() -> None:
    from medplib.core.masks import _decode_counts

    rng = np.random.default_rng(1)
    for _ in range(200):  # any string of the alphabet that ends a group: the loop's runs, or an error
        counts = "".join(chr(48 + int(c)) for c in rng.integers(0, 64, rng.integers(1, 40)))
        counts = counts[:-1] + chr(48 + (ord(counts[-1]) - 48) % 32)  # the last group ends
        expected = _decode_counts_one_char_at_a_time(counts)
        if max(len(group) for group in _groups(counts)) > 8:
            with pytest.raises(ValueError, match="5-bit groups"):
                _decode_counts(counts)
        elif any(run < 0 for run in expected):
            with pytest.raises(ValueError, match="negative run"):
                _decode_counts(counts)
        else:
            assert _decode_counts(counts) == expected, counts
    assert _decode_counts("") == []
    with pytest.raises(ValueError, match="outside the COCO alphabet"):
        _decode_counts("12é3")


def _groups(counts: str) -> list[str]:
    """The characters of each value (a group with the continuation bit 0x20 goes on)."""
    groups, current = [], ""
    for ch in counts:
        current += ch
        if not (ord(ch) - 48) & 0x20:
            groups.append(current)
            current = ""
    return groups
