"""NIfTI-1 and NIfTI-2 volumes (.nii and .nii.gz) read from bytes with nibabel.

The header is parsed first and the volume's size checked against the limits; only then is the
data inflated, and never past the size the header declares, so a gzip bomb costs nothing. Volumes
are reoriented to nibabel's closest canonical (RAS+) so that axis names are true anatomy.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np

from medplib.core.errors import ImageTooLargeError, InvalidInputError, MedplibError, UnsupportedFormatError
from medplib.core.image import ImageLimits
from medplib.core.io.volume import MedicalVolume, VolumeMeta, check_index

GZIP_MAGIC = b"\x1f\x8b"
HEADER_BYTES = 544  # a NIfTI-2 header and its extension flag; a NIfTI-1 header is shorter


def read_nifti_header(data: bytes, *, source: str) -> tuple[int, str, bytes] | None:
    """(version 1 or 2, byte order '<' or '>', header bytes) if `data` is a single-file NIfTI.

    Gzipped data is inflated only as far as the header.
    """
    head = _inflate(data, HEADER_BYTES, source=source) if data.startswith(GZIP_MAGIC) else data[:HEADER_BYTES]
    if len(head) < 348:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        if sizeof_hdr == 348 and head[344:348] == b"n+1\x00":
            return 1, order, head
        if sizeof_hdr == 540 and head[4:8] == b"n+2\x00":
            return 2, order, head
    return None


def load_nifti_volume(
    data: bytes, *, source: str, volume_index: int | None, limits: ImageLimits
) -> MedicalVolume:
    """The (one) 3-D volume of a NIfTI file, reoriented to closest canonical RAS+.

    4-D series need `volume_index`; data keeps its stored dtype unless the header scales it, in
    which case it is float32.
    """
    import nibabel as nib

    found = read_nifti_header(data, source=source)
    if found is None:
        raise UnsupportedFormatError(f"{source}: not a single-file NIfTI-1 or NIfTI-2 image")
    version, order, head = found
    header_class, image_class = {
        1: (nib.Nifti1Header, nib.Nifti1Image),
        2: (nib.Nifti2Header, nib.Nifti2Image),
    }[version]
    try:
        header = header_class(head[: header_class.template_dtype.itemsize], endianness=order, check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = max(int(header.get_data_offset()), header.single_vox_offset)
    except Exception as exc:  # nibabel's HeaderDataError and friends, for a corrupt header
        raise InvalidInputError(f"{source}: corrupt NIfTI header ({exc})") from None
    spatial, num_volumes = _volume_layout(shape, source=source)
    if num_volumes > 1 and volume_index is None:
        raise InvalidInputError(
            f"{source}: 4-D NIfTI with {num_volumes} volumes needs a volume index (0..{num_volumes - 1})"
        )
    index = check_index(
        "volume index", 0 if volume_index is None else volume_index, num_volumes, source=source
    )
    voxels = math.prod(spatial)
    if voxels > limits.max_voxels:
        raise ImageTooLargeError(
            f"{source}: NIfTI volume of {'x'.join(map(str, spatial))} voxels is over the limit of"
            f" {limits.max_voxels} voxels"
        )
    size = offset + voxels * num_volumes * itemsize
    if size > limits.max_bytes:
        raise ImageTooLargeError(
            f"{source}: NIfTI data of {size} bytes (decompressed) is over the limit of"
            f" {limits.max_bytes} bytes"
        )
    raw = _inflate(data, size, source=source) if data.startswith(GZIP_MAGIC) else data
    if len(raw) < size:
        raise InvalidInputError(
            f"{source}: truncated NIfTI file: the header declares {size} bytes, the file holds {len(raw)}"
        )
    try:
        image = image_class.from_bytes(raw)
        canonical = _canonical(image, spatial, index, len(shape))
    except MedplibError:
        raise
    except Exception as exc:  # nibabel raises a zoo of types for inconsistent files
        raise InvalidInputError(f"{source}: corrupt NIfTI file ({exc})") from None
    array = np.asanyarray(canonical.dataobj)
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # header scaling gives float64; float32 halves the memory
    hdr = canonical.header
    zoom_x, zoom_y, zoom_z = (float(zoom) for zoom in hdr.get_zooms()[:3])
    cal_min, cal_max = float(hdr["cal_min"]), float(hdr["cal_max"])
    description = hdr["descrip"].item().decode("latin-1").strip("\x00 ") or None
    return MedicalVolume(
        data=array,
        affine=np.asarray(canonical.affine, dtype=np.float64),
        zooms=(zoom_x, zoom_y, zoom_z),
        file_affine=np.asarray(image.affine, dtype=np.float64),
        meta=VolumeMeta(
            source=source,
            format="nifti",
            original_dtype=header.get_data_dtype().name,
            # cal_min/cal_max is NIfTI's display range, the counterpart of a DICOM window.
            file_window=(cal_min, cal_max) if cal_max > cal_min else None,
            description=description,
            volume_index=index if num_volumes > 1 else None,
            num_volumes=num_volumes,
        ),
    )


def _volume_layout(shape: tuple[int, ...], *, source: str) -> tuple[tuple[int, int, int], int]:
    """((x, y, z), number of volumes) of a header shape: 2-D gets z = 1, trailing 1s are ignored."""
    extra = shape[4:]
    if len(shape) < 2 or any(n != 1 for n in extra) or any(n <= 0 for n in shape):
        raise UnsupportedFormatError(
            f"{source}: NIfTI of shape {shape} is not a 2-D, 3-D or 4-D image (only those are supported)"
        )
    x, y, z = (*shape[:3], 1)[:3]
    return (x, y, z), shape[3] if len(shape) > 3 else 1


def _canonical(image: Any, spatial: tuple[int, int, int], index: int, ndim: int) -> Any:
    """Volume `index` of `image` as a 3-D image in closest canonical (RAS+) orientation."""
    import nibabel as nib

    # Slicing the array proxy reads only the chosen volume of a 4-D series.
    block = image.dataobj[:, :, :, index] if ndim > 3 else image.dataobj[...]
    volume = type(image)(np.asanyarray(block).reshape(spatial), image.affine, image.header)
    return nib.as_closest_canonical(volume)


def _inflate(data: bytes, limit: int, *, source: str) -> bytes:
    """At most `limit` bytes of a gzip stream: the cap that defuses a decompression bomb."""
    try:
        return zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(data, limit)
    except zlib.error as exc:
        raise InvalidInputError(f"{source}: corrupt gzip data ({exc})") from None
