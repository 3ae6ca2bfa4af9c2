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

# Public names whose modules import torch: resolved on first use (PEP 562), so `import medplib` stays cheap.
_LAZY = {
    "load": "medplib.core.assistant",
    "MedPLIB": "medplib.core.assistant",
    "Query": "medplib.core.queries",
    "ChatMessage": "medplib.core.queries",
    "AnswerResult": "medplib.core.results",
    "GroundingResult": "medplib.core.results",
    "ChatResult": "medplib.core.results",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medplib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
    "UnsupportedFormatError",
    "__version__",
    "load",
]
