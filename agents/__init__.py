"""Serving (Ray) and agent integrations (LangChain).

    from medplib.agents import MedPLIBToolkit

Importing `medplib.agents` is cheap: the LangChain tools (and with them langchain-core, an optional
dependency: `pip install 'medplib[agents]'`) load when a name below is first used; torch loads only
with a model.
"""

from __future__ import annotations

# Public name -> module, resolved on first use (PEP 562).
_LAZY = {
    "MedPLIBToolkit": "medplib.agents.toolkit",
    "ImageStore": "medplib.agents.image_store",
    "StoredImage": "medplib.agents.image_store",
    "Backend": "medplib.agents.backends",
    "InProcessBackend": "medplib.agents.backends",
    "HTTPBackend": "medplib.agents.client",
    "MedPLIBClient": "medplib.agents.client",
    "ServeConfig": "medplib.agents.serve_config",
    "MedicalVQATool": "medplib.agents.tools",
    "MedicalRegionVQATool": "medplib.agents.tools",
    "MedicalGroundingTool": "medplib.agents.tools",
    "GroundingArtifact": "medplib.agents.tools",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medplib.agents' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
