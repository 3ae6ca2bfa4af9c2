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
from medplib.core.lazy import lazy_exports

# Public names whose modules import torch: resolved on first use (PEP 562), so `import medplib` stays cheap.
_LAZY = {
    "load": "medplib.loading",
    "load_model": "medplib.loading",
    "MedPLIB": "medplib.core.assistant",
    "Query": "medplib.core.queries",
    "ChatMessage": "medplib.core.queries",
    "AnswerResult": "medplib.core.results",
    "GroundingResult": "medplib.core.results",
    "ChatResult": "medplib.core.results",
    "TextDelta": "medplib.core.results",
}

__getattr__, __dir__ = lazy_exports("medplib", _LAZY, globals())

__all__ = [
    "AnswerResult",
    "CapacityError",
    "ChatMessage",
    "ChatResult",
    "CheckpointError",
    "GroundingResult",
    "ImageTooLargeError",
    "InvalidInputError",
    "MedPLIB",
    "MedplibError",
    "PluginError",
    "Query",
    "RegionError",
    "TextDelta",
    "UnsupportedFormatError",
    "__version__",
    "load",
    "load_model",
]
