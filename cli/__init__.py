"""The `medplib` command line: one module per command group, all registered on one Typer app.

- `common`: the app, the one-line error contract, the image options;
- `images`: inspect; `data`: data build|stats|check, demo;
- `ask`: ask, ground on one image; `volume`: ask, ground through a volume;
- `training`: train, pipeline, plot; `evaluation`: eval;
- `models`: experts, info, convert, quantize; `serving`: serve, ui.
"""

from __future__ import annotations

import importlib

from medplib.cli.common import app

# Importing a command module registers its commands on `app`, in this order in `medplib --help`.
for _module in ("images", "ask", "data", "models", "training", "evaluation", "serving"):
    importlib.import_module(f"medplib.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    app()
