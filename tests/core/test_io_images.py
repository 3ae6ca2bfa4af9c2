"""load_image on raster files, arrays and PIL images: intensity rules, sources, and every bad input."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits, MedicalImage
from medplib.core.io import WINDOW_PRESETS, load_image, load_volume, sniff_format
from medplib.core.io.intensity import apply_window, window_bounds


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def grey8() -> np.ndarray:
    return np.arange(48 * 64, dtype=np.uint8).reshape(48, 64)


# --- sources ---------------------------------------------------------------------------------------


def test_png_from_path_memory_uri_and_bytes_agree(tmp_path: Path, memory_uri, grey8: np.ndarray) -> None:
    data = encode(grey8)
    path = tmp_path / "scan.png"
    path.write_bytes(data)
    images = [
        load_image(path),
        load_image(str(path)),
        load_image(memory_uri(data, "scan.png")),
        load_image(data),
    ]
    for image in images:
        assert image.size == (48, 64)
        assert image.meta.format == "png"
        np.testing.assert_array_equal(image.pixels, images[0].pixels)
    assert images[0].meta.source == str(path)
    assert images[2].meta.source.startswith("memory://")
    assert images[3].meta.source == "<bytes>"


def test_format_is_told_by_content_not_name(tmp_path: Path, grey8: np.ndarray) -> None:
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(encode(grey8, "JPEG", quality=95))
    assert load_image(path).meta.format == "jpeg"
    assert sniff_format(encode(grey8), name="x.dcm") == "png"


def test_medical_image_is_returned_as_is(grey8: np.ndarray) -> None:
    image = load_image(grey8)
    assert load_image(image) is image


# --- intensity ------------------------------------------------------------------------------------


def test_uint8_grey_passes_through_unchanged(grey8: np.ndarray) -> None:
    image = load_image(encode(grey8))
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (48, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image.pixels[:, :, channel], grey8)
    assert image.meta.window is None
    assert image.meta.original_dtype == "uint8"
    assert image.meta.value_range == (float(grey8.min()), float(grey8.max()))


def test_uint8_rgb_passes_through_and_rgba_drops_alpha() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(encode(rgba)).pixels, rgba[:, :, :3])
    np.testing.assert_array_equal(load_image(rgba[:, :, :3]).pixels, rgba[:, :, :3])
    np.testing.assert_array_equal(load_image(rgba).pixels, rgba[:, :, :3])


def test_sixteen_bit_png_is_scaled_from_its_own_range_not_cast() -> None:
    values = np.linspace(1000, 3000, 40 * 50).reshape(40, 50).astype(np.uint16)
    image = load_image(encode(values))
    grey = image.pixels[:, :, 0].astype(int)
    assert image.meta.original_dtype == "uint16"
    assert image.meta.window == (1000.0, 3000.0)
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.ravel()) >= 0), "scaling must keep the order of values"


def test_explicit_window_maps_center_to_mid_grey() -> None:
    values = np.array([[0, 100, 200, 300, 400]], dtype=np.int16)
    image = load_image(values, window=(200, 200))  # low 100, high 300
    np.testing.assert_array_equal(image.pixels[0, :, 0], [0, 0, 128, 255, 255])
    assert image.meta.window == (100.0, 300.0)


def test_window_presets_are_center_width_pairs() -> None:
    assert window_bounds("lung", data_range=(0, 1)) == (-1350.0, 150.0)
    assert window_bounds("brain", data_range=(0, 1)) == (0.0, 80.0)
    assert window_bounds("minmax", data_range=(-5, 7)) == (-5, 7)
    assert window_bounds(None, data_range=(-5, 7), file_window=(1, 2)) == (1, 2)
    assert set(WINDOW_PRESETS) >= {
        "brain",
        "subdural",
        "stroke",
        "lung",
        "mediastinum",
        "abdomen",
        "liver",
        "bone",
        "soft_tissue",
    }


def test_float_data_ignores_nan_and_inf_for_the_range_and_shows_them_black() -> None:
    values = np.array([[np.nan, 0.0, 0.5, 1.0, np.inf, -np.inf]], dtype=np.float32)
    image = load_image(values)
    assert image.meta.value_range == (0.0, 1.0)
    np.testing.assert_array_equal(image.pixels[0, :, 0], [0, 0, 128, 255, 0, 0])


def test_constant_and_all_nan_images_do_not_divide_by_zero() -> None:
    with np.errstate(all="raise"):
        constant = load_image(np.full((8, 8), 700, dtype=np.int16))
        empty = load_image(np.full((8, 8), np.nan))
    assert constant.meta.value_range == (700.0, 700.0)
    assert not constant.pixels.any()
    assert empty.meta.value_range == (0.0, 0.0) and not empty.pixels.any()


def test_bool_and_single_channel_arrays() -> None:
    mask = np.zeros((6, 7), dtype=bool)
    mask[2:4, 3:5] = True
    image = load_image(mask)
    assert set(np.unique(image.pixels)) == {0, 255}
    np.testing.assert_array_equal(image.pixels[:, :, 1] == 255, mask)
    np.testing.assert_array_equal(load_image(mask[:, :, None]).pixels, image.pixels)


def test_sixteen_bit_rgb_is_windowed_jointly() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 32768, 65535
    pixels = load_image(rgb).pixels
    assert pixels[0, 0].tolist() == [0, 128, 255]


def test_apply_window_saturates_outside_the_window() -> None:
    out = apply_window(np.array([-5000, 0, 5000], dtype=np.int32), -100, 100)
    assert out.tolist() == [0, 128, 255]


def test_sixteen_bit_tiff_and_float_tiff(tmp_path: Path) -> None:
    values = (np.arange(30 * 40, dtype=np.uint16) * 50).reshape(30, 40)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, values)
    image = load_image(path)
    assert image.meta.format == "tiff" and image.meta.original_dtype == "uint16"
    assert image.pixels[0, 0, 0] == 0 and image.pixels[-1, -1, 0] == 255
    floats = values.astype(np.float32) / 7
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, floats)
    assert load_image(buffer.getvalue()).meta.original_dtype == "float32"


def test_palette_and_pil_inputs() -> None:
    palette = Image.new("P", (10, 5))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 5, 5))
    image = load_image(palette)
    assert image.pixels[0, 0].tolist() == [255, 0, 0] and image.pixels[0, 9].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(load_image(encode(np.asarray(palette.convert("RGB")))).pixels, image.pixels)
    wide = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert load_image(wide).pixels[:, :, 0].tolist() == [[0, 64], [128, 255]]


def test_window_on_uint8_is_applied_when_asked() -> None:
    values = np.array([[0, 40, 80]], dtype=np.uint8)
    assert load_image(values, window="brain").pixels[0, :, 0].tolist() == [0, 128, 255]


# --- bad input ------------------------------------------------------------------------------------


def test_truncated_png(grey8: np.ndarray) -> None:
    data = encode(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match="truncated or corrupt PNG"):
        load_image(data[: len(data) // 2])


def test_random_bytes_name_the_source_and_the_supported_formats(memory_uri) -> None:
    uri = memory_uri(np.random.default_rng(2).bytes(4096), "noise.bin")
    with pytest.raises(UnsupportedFormatError, match=r"noise\.bin.*supported: PNG, JPEG, TIFF, DICOM"):
        load_image(uri)


def test_gzip_that_is_not_nifti_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormatError, match="not a recognised image format"):
        load_image(gzip.compress(b"hello" * 200))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(InvalidInputError, match="directory"):
        load_image(tmp_path)


def test_png_header_claiming_a_huge_image_is_refused_before_decoding(png_claiming) -> None:
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(png_claiming(9000, 9000))  # 81 Mpx: over our default 64 Mpx, under PIL's own check
    with pytest.raises(ImageTooLargeError):
        load_image(png_claiming(100_000, 100_000))  # caught by PIL's decompression-bomb check
    with pytest.raises(ImageTooLargeError, match="over the limit of 100 pixels"):
        load_image(encode(np.zeros((20, 20), np.uint8)), limits=ImageLimits(max_pixels=100))


def test_oversized_bytes_and_arrays() -> None:
    data = encode(np.zeros((20, 20), np.uint8))
    with pytest.raises(ImageTooLargeError, match="bytes"):
        load_image(data, limits=ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(np.zeros((20, 20)), limits=ImageLimits(max_pixels=399))


def test_unknown_window_preset_lists_valid_names(grey8: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown window preset 'lungs'.*lung.*bone.*soft_tissue"):
        load_image(grey8, window="lungs")


@pytest.mark.parametrize("window", [(40, 0), (40, -10), (float("nan"), 80), ("a", "b"), (1, 2, 3), 5])
def test_bad_window_values(grey8: np.ndarray, window: object) -> None:
    with pytest.raises(InvalidInputError, match="window"):
        load_image(grey8, window=window)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 5)), r"shape \(H, W\).*\(4, 4, 5\)"),
        (np.zeros(16), r"\(16,\)"),
        (np.zeros((2, 4, 4, 3)), r"\(2, 4, 4, 3\)"),
        (np.zeros((0, 4)), "empty size"),
        (np.zeros((4, 4), dtype=np.complex64), "numeric or bool"),
        (np.array([["a", "b"]]), "numeric or bool"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_image(array)


def test_options_that_do_not_apply_are_refused(grey8: np.ndarray) -> None:
    data = encode(grey8)
    with pytest.raises(InvalidInputError, match="slice_index=3 does not apply to a PNG image"):
        load_image(data, slice_index=3)
    with pytest.raises(InvalidInputError, match="volume_index"):
        load_image(grey8, volume_index=0)
    with pytest.raises(InvalidInputError, match=r"frame 2 is out of range.*valid: 0\.\.0"):
        load_image(data, frame=2)
    assert load_image(data, frame=0).size == (48, 64)


def test_unsupported_source_type() -> None:
    with pytest.raises(InvalidInputError, match="expected a path, URI, bytes, numpy array"):
        load_image(42)


def test_a_flat_image_is_not_a_volume(grey8: np.ndarray) -> None:
    with pytest.raises(UnsupportedFormatError, match="PNG file is a 2-D image, not a volume"):
        load_volume(encode(grey8))


def test_results_are_canonical(grey8: np.ndarray) -> None:
    for source in (grey8, encode(grey8), grey8.astype(np.float64)):
        image = load_image(source)
        assert isinstance(image, MedicalImage)
        assert image.pixels.dtype == np.uint8 and image.pixels.shape == (48, 64, 3)
        assert image.pixels.flags.c_contiguous
