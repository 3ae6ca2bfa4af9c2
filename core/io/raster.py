"""PNG, JPEG and TIFF decoding with size checks made on the header, before any pixel is decoded."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np

from medplib.core.errors import ImageTooLargeError, InvalidInputError, UnsupportedFormatError
from medplib.core.image import ImageLimits

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff_raster(data: bytes) -> str | None:
    """The raster format of `data` from its magic bytes, or None if it is not one we decode."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(TIFF_MAGICS):
        return "tiff"
    return None


def check_pixels(height: int, width: int, *, source: str, limits: ImageLimits) -> None:
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"{source}: image has an empty size {width}x{height}")
    if height * width > limits.max_pixels:
        raise ImageTooLargeError(
            f"{source}: image of {width}x{height} pixels is over the limit of {limits.max_pixels} pixels"
            " (a decompression bomb or an oversized image)"
        )


def decode_raster(data: bytes, *, source: str, limits: ImageLimits) -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to the stored array: (H, W) or (H, W, C), in its native dtype.

    TIFF goes through tifffile, which keeps 16-bit and float data as they are; the first page (or
    the first plane of a stack) is returned.
    """
    kind = sniff_raster(data)
    if kind is None:
        raise UnsupportedFormatError(f"{source}: not a PNG, JPEG or TIFF file")
    if kind == "tiff":
        return _decode_tiff(data, source=source, limits=limits)
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixels(image.height, image.width, source=source, limits=limits)
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(f"{source}: {exc}") from None
    except InvalidInputError:  # check_pixels' verdict: a ValueError too, so it must pass first
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying "truncated or corrupt"
        raise InvalidInputError(f"{source}: truncated or corrupt {kind.upper()} file ({exc})") from None
    return pil_to_array(image)


def pil_to_array(image: PILImage) -> np.ndarray:
    """The stored array of a decoded PIL image: palettes expanded, exotic colour modes made RGB.

    Shared by file decoding and by `load_image` when a caller hands us a PIL image directly.
    """
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    return np.asarray(image)


def _decode_tiff(data: bytes, *, source: str, limits: ImageLimits) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = page.shape
            height, width = (shape[0], shape[1]) if len(shape) >= 2 else (0, 0)
            if page.samplesperpixel > 1 and page.planarconfig == 2:  # planar: (C, H, W)
                height, width = shape[1], shape[2]
            check_pixels(height, width, source=source, limits=limits)
            array = page.asarray()
    except (ImageTooLargeError, InvalidInputError):
        raise
    except Exception as exc:  # tifffile raises a zoo of types for broken files
        raise InvalidInputError(f"{source}: truncated or corrupt TIFF file ({exc})") from None
    if array.ndim == 3 and page.planarconfig == 2:
        array = np.moveaxis(array, 0, -1)
    return array
