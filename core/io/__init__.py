"""Image and volume I/O: every supported input becomes a `MedicalImage` or a `MedicalVolume`.

Sources are paths, fsspec URIs or bytes (see `sources`); formats are PNG, JPEG, TIFF (`raster`),
DICOM (`dicom`) and NIfTI (`nifti`), told apart by content. Display windowing is in `intensity`,
volume geometry and slicing in `volume`.
"""

from medplib.core.io.images import load_image, load_volume, sniff_format
from medplib.core.io.intensity import WINDOW_PRESETS, Window
from medplib.core.io.volume import MedicalVolume, VolumeMeta, slice_volume, volume_plane

__all__ = [
    "WINDOW_PRESETS",
    "MedicalVolume",
    "VolumeMeta",
    "Window",
    "load_image",
    "load_volume",
    "slice_volume",
    "sniff_format",
    "volume_plane",
]
