"""The hooks a medplib plugin may implement (all prefixed `medplib_`).

Registration hooks receive a `register` callback, as `llm`'s do, so the manager can tell which plugin
registered what and reject one bad registration without losing the plugin's others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("medplib")
hookimpl = HookimplMarker("medplib")


@hookspec
def medplib_register_experts(register: Callable[[Any], None]) -> None:
    """Call `register(spec)` once per expert, with an `ExpertSpec` (or a dict that validates as one)."""


@hookspec
def medplib_register_datasets(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call `register(name, builder)`; `builder(root, split)` yields MeCoVQA-format records (dicts)."""


@hookspec
def medplib_register_tools(register: Callable[[Any], None]) -> None:
    """Call `register(tool)` with a LangChain `BaseTool` (anything with a `name`) agents may call.

    A toolkit hands out a copy of the tool bound to its run: a tool that declares a `backend` (or
    `images`) field gets the run's backend (image store), and every call passes the plugins'
    `medplib_before_tool_call` hook first, as the built-in tools' calls do."""


@hookspec
def medplib_before_tool_call(tool_name: str, arguments: dict[str, Any]) -> None:
    """Called before any tool runs: edit `arguments` in place, or raise `InvalidInputError` to refuse."""
