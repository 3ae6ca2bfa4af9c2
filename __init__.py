"""medplib: a pixel-level biomedical multimodal assistant (after MedPLIB, arXiv 2412.09278).

Importing `medplib` is cheap: heavy modules (torch, transformers) load only when a name that needs
them is first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from medplib.core.errors import (
    CapacityError,
    CheckpointError,
    ImageTooLargeError,
    InvalidInputError,
    MedplibError,
    PluginError,
    RegionError,
    UnsupportedFormatError,
)

__all__ = [
    "CapacityError",
    "CheckpointError",
    "ImageTooLargeError",
    "InvalidInputError",
    "MedplibError",
    "PluginError",
    "RegionError",
    "UnsupportedFormatError",
    "__version__",
]
