"""NIfTI volumes: the real MNI152 template, orientation and spacing on synthetic volumes, and bad files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits
from medplib.core.io import load_image, load_volume, slice_volume, sniff_format, volume_plane

MNI_SHAPE = (197, 233, 189)
# After rot90 the rows are the second in-plane axis: axial (y, x), coronal (z, x), sagittal (z, y).
PLANE_SHAPES = {"sagittal": (189, 233), "coronal": (189, 197), "axial": (233, 197)}


def nifti_bytes(data: np.ndarray, affine: np.ndarray, *, version: int = 1, **header: float) -> bytes:
    image = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(data, affine)
    for key, value in header.items():
        image.header[key] = value
    return image.to_bytes()


@pytest.fixture(scope="module")
def mni_raw(mni_t1_path: Path) -> np.ndarray:
    """The template's voxels as nibabel reads them (already RAS, so no reorientation needed)."""
    image = nib.load(mni_t1_path)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    return np.asarray(image.dataobj)


def test_mni_template_from_path_memory_uri_and_bytes(mni_t1_path: Path, memory_uri) -> None:
    data = mni_t1_path.read_bytes()
    assert sniff_format(data, name="<bytes>") == "nifti"
    images = [load_image(mni_t1_path), load_image(memory_uri(data, "mni.nii.gz")), load_image(data)]
    for image in images:
        np.testing.assert_array_equal(image.pixels, images[0].pixels)
    meta = images[0].meta
    assert (meta.format, meta.axis, meta.volume_shape) == ("nifti", "axial", MNI_SHAPE)
    assert meta.original_dtype == "uint8" and meta.spacing == (1.0, 1.0) and meta.slice_thickness == 1.0


@pytest.mark.parametrize(("axis", "number"), [("sagittal", 0), ("coronal", 1), ("axial", 2)])
def test_mni_planes_have_true_shapes_and_the_middle_by_default(
    mni_t1_path: Path, mni_raw: np.ndarray, axis: str, number: int
) -> None:
    image = load_image(mni_t1_path, axis=axis)
    assert image.size == PLANE_SHAPES[axis]
    assert image.meta.slice_index == MNI_SHAPE[number] // 2
    assert image.meta.axis == axis
    # uint8 data is shown as stored: the plane is the rotated slice of the raw voxels.
    expected = np.rot90(np.take(mni_raw, MNI_SHAPE[number] // 2, axis=number))
    np.testing.assert_array_equal(image.pixels[:, :, 0], expected)
    assert load_image(mni_t1_path, axis=number, slice_index=10).meta.axis == axis


def test_mni_volume_and_mask_slice_on_the_same_grid(mni_t1_path: Path, mni_gm_path: Path) -> None:
    volume, grey_matter = load_volume(mni_t1_path), load_volume(mni_gm_path)
    assert volume.shape == MNI_SHAPE and volume.data.dtype == np.uint8
    assert volume.zooms == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(volume.affine, grey_matter.affine)
    for axis in PLANE_SHAPES:
        image = slice_volume(volume, axis=axis, index=60)
        mask = volume_plane(grey_matter, axis=axis, index=60)
        assert mask.shape == image.size == PLANE_SHAPES[axis]
        assert mask.dtype == np.uint8  # labels are never windowed
        # Grey matter lies inside the head: where the mask is high the T1 is not background.
        assert image.pixels[:, :, 0][mask > 128].min() > 0


def test_displayed_mni_planes_have_anterior_and_superior_up(mni_t1_path: Path) -> None:
    """Real anatomy: MNI's origin is the anterior commissure, which sits in front of the brain's
    middle and below its middle. So in the displayed planes through it, less head lies above it
    (axial: anterior), more head lies above it (coronal: superior), and, sagittally, less head lies
    right of it (anterior is on the right)."""
    volume = load_volume(mni_t1_path)
    x, y, z = np.rint(np.linalg.inv(volume.affine) @ [0, 0, 0, 1]).astype(int)[:3]
    last_y, last_z = volume.shape[1] - 1, volume.shape[2] - 1

    def head_extent(plane: np.ndarray) -> tuple[int, int, int, int]:
        rows, cols = np.flatnonzero((plane > 50).any(axis=1)), np.flatnonzero((plane > 50).any(axis=0))
        return rows.min(), rows.max(), cols.min(), cols.max()

    top, bottom, _, _ = head_extent(volume_plane(volume, axis="axial", index=z))
    assert last_y - y - top < bottom - (last_y - y)  # AC row is last_y - y
    top, bottom, _, _ = head_extent(volume_plane(volume, axis="coronal", index=y))
    assert last_z - z - top > bottom - (last_z - z)
    _, _, left, right = head_extent(volume_plane(volume, axis="sagittal", index=x))
    assert right - y < y - left


def test_nilearn_template_image_object() -> None:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    assert template.shape == MNI_SHAPE
    data = template.to_bytes()  # nilearn's 0..1 floats, stored as uint8 with a scale factor
    assert load_volume(data).data.dtype == np.float32
    image = load_image(data)
    assert image.size == PLANE_SHAPES["axial"]
    assert 0.0 <= image.meta.value_range[0] < image.meta.value_range[1] <= 1.0
    assert image.meta.window == (0.0, 1.0)  # the header's cal_min/cal_max display range


def test_reorientation_puts_anterior_up_and_right_on_the_right() -> None:
    data = np.zeros((4, 5, 6), dtype=np.int16)
    data[0, 4, 2] = 100  # voxel x=0 is the patient's far right under this LAS affine; y=4 is anterior
    affine = np.diag([-2.0, 3.0, 4.0, 1.0])
    volume = load_volume(nifti_bytes(data, affine))
    assert volume.shape == (4, 5, 6)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    plane = volume_plane(volume, axis="axial", index=2)
    assert plane.shape == (5, 4)
    assert np.argwhere(plane).tolist() == [[0, 3]]  # top row (anterior), last column (right)


def test_swapped_axes_are_reoriented_with_their_spacing() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = np.array([[2.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # voxel y is world z
    volume = load_volume(nifti_bytes(data, affine))
    assert volume.shape == (4, 6, 5) and volume.zooms == (2.0, 4.0, 3.0)
    spacings = {axis: load_image(nifti_bytes(data, affine), axis=axis).meta for axis in PLANE_SHAPES}
    assert spacings["axial"].spacing == (4.0, 2.0) and spacings["axial"].slice_thickness == 3.0
    assert spacings["coronal"].spacing == (3.0, 2.0) and spacings["coronal"].slice_thickness == 4.0
    assert spacings["sagittal"].spacing == (3.0, 4.0) and spacings["sagittal"].slice_thickness == 2.0
    assert spacings["axial"].volume_shape == (4, 6, 5)


def test_nifti2_big_endian_scaled_and_display_range() -> None:
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    plain = load_volume(nifti_bytes(data, np.eye(4), version=2))
    np.testing.assert_array_equal(plain.data, data)
    big = nib.Nifti1Image(data.astype(">i2"), np.eye(4), nib.Nifti1Header(endianness=">"))
    assert big.to_bytes()[:4] == b"\x00\x00\x01\x5c"
    np.testing.assert_array_equal(load_volume(big.to_bytes()).data, data)
    scaled = load_volume(nifti_bytes(data, np.eye(4), scl_slope=2.0, scl_inter=1.0))
    assert scaled.data.dtype == np.float32
    np.testing.assert_array_equal(scaled.data, data * 2.0 + 1)
    windowed = load_image(nifti_bytes(data, np.eye(4), cal_min=10, cal_max=20))
    assert windowed.meta.window == (10.0, 20.0)


def test_four_d_needs_a_volume_index(memory_uri) -> None:
    data = np.stack([np.full((3, 4, 5), value, dtype=np.int16) for value in (10, 20, 30)], axis=-1)
    uri = memory_uri(gzip.compress(nifti_bytes(data, np.eye(4))), "series.nii.gz")
    with pytest.raises(InvalidInputError, match=r"4-D NIfTI with 3 volumes needs a volume index \(0\.\.2\)"):
        load_image(uri)
    second = load_volume(uri, volume_index=1)
    assert second.shape == (3, 4, 5) and np.all(second.data == 20)
    assert (second.meta.volume_index, second.meta.num_volumes) == (1, 3)
    image = load_image(uri, volume_index=2, axis="coronal")
    assert (image.meta.frame, image.meta.num_frames, image.size) == (2, 3, (5, 3))
    with pytest.raises(InvalidInputError, match=r"volume index 3 is out of range.*valid: 0\.\.2"):
        load_volume(uri, volume_index=3)


def test_slice_and_axis_errors(mni_t1_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"axial slice 189 is out of range.*valid: 0\.\.188"):
        load_image(mni_t1_path, slice_index=189)
    with pytest.raises(InvalidInputError, match=r"sagittal slice -1 is out of range.*0\.\.196"):
        load_image(mni_t1_path, axis="sagittal", slice_index=-1)
    with pytest.raises(InvalidInputError, match="axis must be one of sagittal, coronal, axial"):
        load_image(mni_t1_path, axis="transverse")
    with pytest.raises(InvalidInputError, match="frame=1 does not apply to a NIfTI volume"):
        load_image(mni_t1_path, frame=1)


def test_two_d_nifti_is_a_one_slice_volume() -> None:
    volume = load_volume(nifti_bytes(np.ones((6, 7), dtype=np.uint8), np.eye(4)))
    assert volume.shape == (6, 7, 1)


def gzip_bomb(shape: tuple[int, ...], payload: int) -> bytes:
    """A .nii.gz whose header claims `shape` (uint8) followed by `payload` zero bytes, compressed."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(header.binaryblock + b"\x00" * 4)]
    parts += [compressor.compress(chunk) for _ in range(payload >> 20)]
    return b"".join([*parts, compressor.flush()])


def test_gzip_bomb_is_refused_from_its_header() -> None:
    bomb = gzip_bomb((4096, 4096, 4096), 64 << 20)  # claims 68 G voxels; holds 64 MiB of zeros
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="voxels is over the limit"):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError, match=r"decompressed.*over the limit of 1000000 bytes"):
        load_volume(gzip_bomb((128, 128, 128), 2 << 20), limits=ImageLimits(max_bytes=1_000_000))


def test_gzip_padding_past_the_declared_data_is_never_inflated() -> None:
    volume = load_volume(gzip_bomb((16, 16, 16), 64 << 20))  # 4 KiB of voxels, 64 MiB of padding
    assert volume.shape == (16, 16, 16) and not volume.data.any()


def test_truncated_and_corrupt_nifti(mni_t1_path: Path) -> None:
    data = mni_t1_path.read_bytes()
    with pytest.raises(InvalidInputError, match="truncated NIfTI file"):
        load_image(data[: len(data) // 2])
    raw = nifti_bytes(np.ones((8, 8, 8), dtype=np.float32), np.eye(4))
    with pytest.raises(InvalidInputError, match="truncated NIfTI file: the header declares 2400 bytes"):
        load_image(raw[:-100])
    with pytest.raises(InvalidInputError, match="corrupt gzip data"):
        load_image(gzip.compress(raw, mtime=0)[:10] + b"\xff" * 600)  # a gzip header, then no deflate


def test_nifti_pair_header_is_unsupported() -> None:
    pair = nib.Nifti1Pair(np.ones((2, 2, 2), np.uint8), np.eye(4)).header.binaryblock
    with pytest.raises(UnsupportedFormatError, match=r"supported: .*NIfTI"):
        load_image(pair + bytes(8))
