"""DICOM loading on real files from pydicom and pydicom-data: units, windows, colour, frames, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits
from medplib.core.io import load_image, load_volume, slice_volume, volume_plane


def raw_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def saved(ds: pydicom.Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, **kwargs)
    return buffer.getvalue()


def test_ct_from_path_memory_uri_and_bytes(dicom_file, memory_uri) -> None:
    path = dicom_file("CT_small.dcm")
    data = path.read_bytes()
    images = [load_image(path), load_image(memory_uri(data, "ct")), load_image(data)]
    for image in images:
        np.testing.assert_array_equal(image.pixels, images[0].pixels)
    meta = images[0].meta
    assert (meta.format, meta.modality, meta.width, meta.height) == ("dicom", "CT", 128, 128)
    assert meta.spacing == pytest.approx((0.661468, 0.661468))
    assert meta.slice_thickness == 5.0
    assert meta.original_dtype == "int16"
    assert (meta.frame, meta.num_frames) == (0, 1)


def test_ct_rescale_gives_hounsfield_units(dicom_file) -> None:
    path = dicom_file("CT_small.dcm")
    raw = raw_pixels(path).astype(np.float64)
    hu = raw - 1024  # RescaleSlope 1, RescaleIntercept -1024 in the header
    image = load_image(path, window=(40, 400))  # low -160, high 240 HU
    assert image.meta.value_range == (hu.min(), hu.max())
    assert image.meta.window == (-160.0, 240.0)
    expected = np.floor(np.clip((hu + 160) * 255 / 400, 0, 255) + 0.5)
    np.testing.assert_array_equal(image.pixels[:, :, 0], expected)


def test_window_presets_change_the_output(dicom_file) -> None:
    path = dicom_file("CT_small.dcm")
    brain, bone, lung = (load_image(path, window=name) for name in ("brain", "bone", "lung"))
    assert brain.meta.window == (0.0, 80.0) and bone.meta.window == (-500.0, 1300.0)
    assert not np.array_equal(brain.pixels, bone.pixels)
    assert not np.array_equal(bone.pixels, lung.pixels)
    # A narrow brain window saturates far more pixels than a wide bone window.
    saturated = [np.isin(im.pixels[:, :, 0], (0, 255)).mean() for im in (brain, bone)]
    assert saturated[0] > saturated[1]
    with pytest.raises(InvalidInputError, match=r"unknown window preset 'skull'.*valid presets"):
        load_image(path, window="skull")


def test_file_window_is_the_default(dicom_file) -> None:
    mr = load_image(dicom_file("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    assert mr.meta.window == (-200.0, 1400.0)
    assert load_image(dicom_file("MR_small.dcm"), window="minmax").meta.window == mr.meta.value_range


def test_abdomen_mr_metadata(dicom_file) -> None:
    image = load_image(dicom_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    meta = image.meta
    assert (meta.modality, meta.body_part, image.size) == ("MR", "ABDOMEN", (484, 484))
    assert meta.description == "abdomen^liver / marked lesion<MPR Collection>"
    assert meta.spacing == pytest.approx((0.72314049586777, 0.72314049586777))
    assert meta.slice_thickness == 4.0
    assert meta.window == (450 - 790 / 2, 450 + 790 / 2)  # first of the multi-valued window tags


def test_monochrome1_chest_radiograph_is_inverted(dicom_file) -> None:
    path = dicom_file("RG1_UNCI.dcm")
    raw = raw_pixels(path)
    image = load_image(path, window="minmax")
    meta = image.meta
    assert (image.size, meta.modality, meta.body_part) == ((1955, 1841), "CR", "CHEST")
    assert meta.spacing is None  # the file says 0.000\0.000, which is no spacing at all
    grey = image.pixels[:, :, 0]
    assert grey.flat[raw.argmin()] == 255 and grey.flat[raw.argmax()] == 0
    # Ordering is reversed everywhere: higher stored value, darker pixel.
    sample = np.random.default_rng(0).choice(raw.size, 2000, replace=False)
    order = np.argsort(raw.flat[sample], kind="stable")
    assert np.all(np.diff(grey.flat[sample][order].astype(int)) <= 0)


def test_tibia_radiograph(dicom_file) -> None:
    image = load_image(dicom_file("RG3_UNCI.dcm"))
    meta = image.meta
    assert (image.size, meta.modality, meta.body_part) == ((1760, 1760), "CR", "EXTREMITY")
    assert meta.description == "Non-ossifying fibroma of distal tibia"
    assert meta.window == (550 - 512, 550 + 512)


def test_rescale_slope_on_mr(dicom_file) -> None:
    path = dicom_file("MR2_UNCI.dcm")
    image = load_image(path)
    raw = raw_pixels(path)
    assert image.meta.value_range == pytest.approx(
        (raw.min() * 3.774114 + 0.000061, raw.max() * 3.774114 + 0.000061)
    )
    assert image.meta.description == "SHOULDER" and image.meta.spacing == pytest.approx((0.195313, 0.195313))


def test_rgb_ultrasound_passes_through(dicom_file) -> None:
    path = dicom_file("US1_UNCI.dcm")
    image = load_image(path)
    assert image.meta.modality == "US" and image.size == (480, 640)
    assert image.meta.window is None
    np.testing.assert_array_equal(image.pixels, raw_pixels(path))


def test_palette_colour_is_expanded(dicom_file) -> None:
    image = load_image(dicom_file("examples_palette.dcm"))
    assert image.size == (350, 800)
    channels = image.pixels.reshape(-1, 3).astype(int)
    assert (channels[:, 0] != channels[:, 2]).mean() > 0.1, "a palette image should not come out grey"


def test_ybr_is_converted_to_rgb(dicom_file) -> None:
    image = load_image(dicom_file("SC_ybr_full_422_uncompressed.dcm"))
    red = image.pixels[0, 0].astype(int)  # the test pattern's first band is red
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_multi_frame_selection(dicom_file) -> None:
    path = dicom_file("emri_small.dcm")
    raw = raw_pixels(path)
    first, sixth = load_image(path), load_image(path, frame=5)
    assert (first.meta.num_frames, first.meta.frame, sixth.meta.frame) == (10, 0, 5)
    assert not np.array_equal(first.pixels, sixth.pixels)
    assert sixth.meta.value_range == (raw[5].min(), raw[5].max())
    with pytest.raises(InvalidInputError, match=r"frame 10 is out of range.*has 10 \(valid: 0\.\.9\)"):
        load_image(path, frame=10)
    with pytest.raises(InvalidInputError, match="out of range"):
        load_image(path, frame=-1)
    with pytest.raises(InvalidInputError, match="slice_index=2 does not apply to a DICOM image"):
        load_image(path, slice_index=2)


def test_multi_frame_as_volume_keeps_frames_as_axial_planes(dicom_file) -> None:
    path = dicom_file("emri_small.dcm")
    raw = raw_pixels(path)
    volume = load_volume(path)
    assert volume.shape == (64, 64, 10)
    assert volume.meta.modality == "MR" and volume.meta.format == "dicom"
    for index in (0, 7):
        np.testing.assert_array_equal(volume_plane(volume, axis="axial", index=index), raw[index])
        np.testing.assert_array_equal(
            slice_volume(volume, axis="axial", index=index).pixels, load_image(path, frame=index).pixels
        )
    assert slice_volume(volume, axis="sagittal").size == (10, 64)


def test_single_frame_ct_volume_is_in_hounsfield_units(dicom_file) -> None:
    volume = load_volume(dicom_file("CT_small.dcm"))
    assert volume.shape == (128, 128, 1) and volume.data.dtype == np.float32
    assert volume.zooms == pytest.approx((0.661468, 0.661468, 5.0))
    assert volume.data.min() == raw_pixels(dicom_file("CT_small.dcm")).min() - 1024


def test_colour_frames_are_not_a_volume(dicom_file) -> None:
    with pytest.raises(UnsupportedFormatError, match="colour frames"):
        load_volume(dicom_file("US1_UNCI.dcm"))


def test_rle_is_decoded_natively(dicom_file) -> None:
    rle = load_image(dicom_file("MR_small_RLE.dcm"))
    np.testing.assert_array_equal(rle.pixels, load_image(dicom_file("MR_small.dcm")).pixels)


def test_syntax_without_an_installed_decoder_is_named(dicom_file) -> None:
    # highdicom (the volumes extra) installs a JPEG-LS decoder; no package decodes H.264 pixel data.
    ds = pydicom.dcmread(dicom_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    with pytest.raises(UnsupportedFormatError, match=r"transfer syntax 'MPEG-4 AVC/H.264.*no decoder"):
        load_image(saved(ds))
    with pytest.raises(UnsupportedFormatError, match="JPEG Extended"):
        load_image(dicom_file("JPEG-lossy.dcm"))  # a plugin is there but cannot do 12-bit JPEG


def test_no_pixel_data(dicom_file) -> None:
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    del ds.PixelData
    with pytest.raises(UnsupportedFormatError, match="no pixel data"):
        load_image(saved(ds))
    with pytest.raises(UnsupportedFormatError, match="no pixel data"):
        load_image(dicom_file("rtplan.dcm"))


def test_truncated_dicom(dicom_file) -> None:
    data = dicom_file("CT_small.dcm").read_bytes()
    with pytest.raises(InvalidInputError, match="pixel data is less than expected"):
        load_image(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=r"MR_truncated\.dcm: cannot decode DICOM pixel data"):
        load_image(dicom_file("MR_truncated.dcm"))


def test_size_limits_are_checked_before_decoding(dicom_file) -> None:
    with pytest.raises(ImageTooLargeError, match="128x128 pixels is over the limit"):
        load_image(dicom_file("CT_small.dcm"), limits=ImageLimits(max_pixels=128 * 127))
    with pytest.raises(ImageTooLargeError, match="10 frames of 64x64 pixels"):
        load_image(dicom_file("emri_small.dcm"), limits=ImageLimits(max_voxels=10 * 64 * 64 - 1))


def test_preamble_less_dcm_is_read_by_name(dicom_file, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    with_meta = saved(ds)[128 + 4 :]  # drop preamble and 'DICM', as some tools write it
    ds.file_meta, ds.preamble = FileMetaDataset(), None  # bare data set: no preamble, no meta group
    without_meta = saved(ds, implicit_vr=False, little_endian=True)
    expected = load_image(dicom_file("CT_small.dcm")).pixels
    for data, name in ((with_meta, "a.dcm"), (without_meta, "b.DCM")):
        path = tmp_path / name
        path.write_bytes(data)
        np.testing.assert_array_equal(load_image(path).pixels, expected)
        with pytest.raises(UnsupportedFormatError, match="not a recognised image format"):
            load_image(data)  # bytes have no name, so no .dcm hint


def test_garbage_named_dcm_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(3).bytes(2048))
    with pytest.raises(InvalidInputError, match=r"noise\.dcm"):
        load_image(path)
