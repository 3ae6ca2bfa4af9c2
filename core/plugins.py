"""The plugin manager: the built-in experts first, as ordinary plugins, then the entry-point group `medplib`.

`MEDPLIB_PLUGINS` limits which installed plugins load: unset loads every one; a comma-separated list of
entry-point or distribution names loads only those; an empty string loads only the built-ins (which
always load: they are the model itself); a name there that matches no installed plugin is a problem.
A plugin that fails to import, clashes with another, or registers something invalid (a spec pydantic
refuses, or one `expert_checks` refuses: a head that cannot be imported, an unknown `trains_on`
task, another expert's token) becomes a `PluginProblem` naming it and the field, and every other
plugin still loads; `medplib experts` prints each problem as one `warning:` line.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
from pydantic import ValidationError

from medplib.core import hookspecs
from medplib.core.errors import PluginError, validation_message
from medplib.core.expert_checks import check_expert
from medplib.core.expert_spec import IDENTIFIER, ExpertSpec

ENTRY_POINT_GROUP = "medplib"
ENV_VAR = "MEDPLIB_PLUGINS"
BUILTIN_PLUGINS = ("medplib.experts.vision_language", "medplib.experts.pixel_grounding")

pm = pluggy.PluginManager("medplib")
pm.add_hookspecs(hookspecs)


@dataclass(frozen=True)
class PluginProblem:
    plugin: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.source}): {one_line(self.reason)}"


def one_line(text: str) -> str:
    """A message on one line (pydantic's and pluggy's span several): each problem is one warning."""
    return " ".join(text.split())


_sources: dict[str, str] = {}
_load_problems: list[PluginProblem] = []
_loaded = False


def load_plugins() -> None:
    """Register the built-ins, then the selected entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_PLUGINS:
        register_plugin(importlib.import_module(module), module.rsplit(".", 1)[-1], "builtin")
    available = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for name in unknown_plugin_names(available=available):  # a typo would load nothing, silently
        installed = ", ".join(sorted({ep.name for ep in available})) or "none"
        reason = f"no installed plugin has this entry-point or distribution name (installed: {installed})"
        _load_problems.append(PluginProblem(name, ENV_VAR, reason))
    for entry_point in selected_entry_points(available=available):
        load_entry_point(entry_point)


def selected_entry_points(
    environ: Mapping[str, str] = os.environ, available: Iterable[metadata.EntryPoint] | None = None
) -> list[metadata.EntryPoint]:
    """The installed entry points `MEDPLIB_PLUGINS` lets load."""
    available = metadata.entry_points(group=ENTRY_POINT_GROUP) if available is None else available
    names = _wanted(environ)
    if names is None:
        return list(available)
    return [ep for ep in available if ep.name in names or (ep.dist is not None and ep.dist.name in names)]


def unknown_plugin_names(
    environ: Mapping[str, str] = os.environ, available: Iterable[metadata.EntryPoint] | None = None
) -> list[str]:
    """The names in `MEDPLIB_PLUGINS` that match no installed entry point or distribution."""
    available = metadata.entry_points(group=ENTRY_POINT_GROUP) if available is None else available
    known = {name for ep in available for name in (ep.name, ep.dist.name if ep.dist else None)}
    return sorted((_wanted(environ) or set()) - known)


def _wanted(environ: Mapping[str, str]) -> set[str] | None:
    wanted = environ.get(ENV_VAR)
    return None if wanted is None else {name.strip() for name in wanted.split(",")} - {""}


def load_entry_point(entry_point: metadata.EntryPoint) -> bool:
    dist = entry_point.dist
    source = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
    try:
        plugin = entry_point.load()
    except Exception as exc:  # whatever a broken plugin raises, the others must still load
        _load_problems.append(PluginProblem(entry_point.name, source, f"failed to import: {_reason(exc)}"))
        return False
    return register_plugin(plugin, entry_point.name, source)


def register_plugin(plugin: object, name: str, source: str = "runtime") -> bool:
    """Register one plugin; a clash or a hook that matches no hookspec is recorded, not raised."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()  # checked per plugin, so only this one can fail here
    except (ValueError, pluggy.PluginValidationError) as exc:
        if pm.get_plugin(name) is plugin:
            pm.unregister(plugin)
        _load_problems.append(PluginProblem(name, source, str(exc)))
        return False
    _sources[name] = source
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return f"invalid {exc.title}: {validation_message(exc)}"
    return str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"


def _collect(
    hook: str,
    kind: str,
    accept: Callable[..., tuple[str, Any]],
    check: Callable[[Any, dict[str, Any]], None] | None = None,
) -> tuple[dict, list]:
    """Call one registration hook plugin by plugin, so a bad registration is blamed on its plugin only;
    `check(item, accepted)` refuses an item that conflicts with those registered before it."""
    load_plugins()
    items: dict[str, Any] = {}
    owners: dict[str, str] = {}
    problems: list[PluginProblem] = []
    for impl in getattr(pm.hook, hook).get_hookimpls():  # registration order: built-ins first
        plugin, source = impl.plugin_name, _sources.get(impl.plugin_name, "runtime")

        def register(*args: Any, _plugin: str = plugin, _source: str = source) -> None:
            try:
                key, item = accept(_source, *args)
                if key in items:
                    raise PluginError(f"{kind} {key!r} is already registered by plugin {owners[key]!r}")
                if check is not None:
                    check(item, items)
            except Exception as exc:  # one bad registration must not cost the plugin its others
                problems.append(PluginProblem(_plugin, _source, _reason(exc)))
                return
            items[key], owners[key] = item, _plugin

        try:  # pluggy lets an implementation omit arguments; `register` is the only one here
            impl.function(*([register] if impl.argnames else []))
        except Exception as exc:
            problems.append(PluginProblem(plugin, source, _reason(exc)))
    return items, problems


def _expert(source: str, spec: Any) -> tuple[str, ExpertSpec]:
    spec = spec if isinstance(spec, ExpertSpec) else ExpertSpec.model_validate(spec)
    return spec.name, spec.model_copy(update={"source": source})


def _dataset(source: str, name: Any, builder: Any) -> tuple[str, Callable[..., Any]]:
    if not (isinstance(name, str) and re.match(IDENTIFIER, name)):
        raise PluginError(f"dataset name {name!r} is not a lower-case identifier")
    if not callable(builder):
        raise PluginError(f"dataset {name!r}: builder {builder!r} is not callable")
    return name, builder


def _tool(source: str, tool: Any) -> tuple[str, Any]:
    if not isinstance(getattr(tool, "name", None), str):
        raise PluginError(f"tool {tool!r} has no name")
    return tool.name, tool


_REGISTRIES = {
    "experts": ("medplib_register_experts", "expert", _expert, check_expert),
    "datasets": ("medplib_register_datasets", "dataset", _dataset),
    "tools": ("medplib_register_tools", "tool", _tool),
}


def get_experts() -> dict[str, ExpertSpec]:
    """Every valid expert by name, built-ins first; `spec.source` says where each came from."""
    return _collect(*_REGISTRIES["experts"])[0]


def get_datasets() -> dict[str, Callable[..., Any]]:
    return _collect(*_REGISTRIES["datasets"])[0]


def get_tools() -> dict[str, Any]:
    return _collect(*_REGISTRIES["tools"])[0]


def plugin_problems() -> list[PluginProblem]:
    """Every plugin that failed to load or registered something invalid, each naming the plugin."""
    load_plugins()
    return [*_load_problems, *(p for args in _REGISTRIES.values() for p in _collect(*args)[1])]


def require_experts(names: Sequence[str]) -> list[ExpertSpec]:
    """The registered specs of `names`, in order; PluginError naming every one that is not registered."""
    experts = get_experts()
    missing = [name for name in names if name not in experts]
    if missing:
        hint = "".join(f"\n  {problem}" for problem in plugin_problems())
        raise PluginError(
            f"expert(s) not registered: {', '.join(missing)} (registered: {', '.join(experts)}); "
            f"install the plugin that provides them or check {ENV_VAR}"
            + (f"; problems:{hint}" if hint else "")
        )
    return [experts[name] for name in names]


def before_tool_call(tool_name: str, arguments: dict[str, Any]) -> None:
    """Let every plugin see (and edit, or refuse by raising) a tool call before it runs."""
    load_plugins()
    pm.hook.medplib_before_tool_call(tool_name=tool_name, arguments=arguments)
