"""`medplib ui`: the page and the `/v1` API in one process, the model in it, no Ray.

medplib ui --model tiny --port 7860      # then open http://127.0.0.1:7860/
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastapi import FastAPI

from medplib.agents.serve.config import API_KEY_ENV, ServeLimits
from medplib.agents.serve.http_api import create_api
from medplib.agents.serve.ui.page import add_page
from medplib.agents.serve.ui.service import InProcessService

if TYPE_CHECKING:
    from medplib.core.assistant import MedPLIB


def build_ui_app(model: MedPLIB, limits: ServeLimits, api_key: str | None) -> FastAPI:
    """The API over a loaded model, with the page at `/`."""
    app = create_api(InProcessService(model), max_body_bytes=limits.max_body_bytes, api_key=api_key)
    add_page(app, limits)
    return app


def serve_ui(model: str, *, host: str, port: int, device: str, max_body_bytes: int) -> None:
    """Load `model` and serve until Ctrl-C; the API key, if any, comes from $MEDPLIB_API_KEY."""
    import uvicorn

    import medplib

    limits = ServeLimits(max_body_bytes=max_body_bytes)
    api_key = os.environ.get(API_KEY_ENV) or None

    assistant = medplib.load(model, device=device, limits=limits.inference(1))
    app = build_ui_app(assistant, limits, api_key)
    shown = "[" + host + "]" if ":" in host else host
    print(
        f"medplib ui: {model} at http://{shown}:{port}/ (API key: {'yes' if api_key else 'none'})",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
