"""Serving (Ray) and agent integrations (LangChain).

    from medplib.agents import MedPLIBToolkit

Importing `medplib.agents` is cheap: the LangChain tools (and with them langchain-core, an optional
dependency: `pip install 'medplib[agents]'`) load when a name below is first used; torch loads only
with a model.
"""

from __future__ import annotations

from medplib.core.lazy import lazy_exports

# Public name -> module, resolved on first use (PEP 562).
_LAZY = {
    "MedPLIBToolkit": "medplib.agents.toolkit",
    "ImageStore": "medplib.agents.image_store",
    "StoredImage": "medplib.agents.image_store",
    "Backend": "medplib.agents.backends",
    "InProcessBackend": "medplib.agents.backends",
    "HTTPBackend": "medplib.agents.serve.http_backend",
    "MedPLIBClient": "medplib.agents.serve.client",
    "ServeConfig": "medplib.agents.serve.config",
    "MedicalVQATool": "medplib.agents.tools",
    "MedicalRegionVQATool": "medplib.agents.tools",
    "MedicalGroundingTool": "medplib.agents.tools",
    "GroundingArtifact": "medplib.agents.tools",
}

__getattr__, __dir__ = lazy_exports("medplib.agents", _LAZY, globals())

__all__ = sorted(_LAZY)
