"""What listing checks about a registered expert beyond its schema: that its import paths resolve,
that it trains on tasks that exist, and that its tokens are its own.

These checks run whenever plugins are listed (`medplib experts`, any `get_experts()`), so they
import nothing heavy: an import path (`ExpertSpec.head`, `pkg.module:name`) is resolved with
`importlib.util.find_spec` (which imports only the parent packages: the plugin's own top module,
already imported to register the spec), and the name is looked up among the module's top-level
bindings by parsing its source, not by running it. A head module needs torch; importing it while
listing would cost seconds per plugin and fail on a machine that only lists or routes. A module the
source of which cannot be read (compiled, generated) passes here and is checked when the head is
built (`ExpertSpec.build_head`).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from medplib.core.errors import PluginError
from medplib.core.expert_spec import SAMPLE_TASKS, ExpertSpec

# Spec fields that name an object by import path ("pkg.module:name"); `head_output` where the spec has it.
IMPORT_PATH_FIELDS = ("head", "head_output")


def check_expert(spec: ExpertSpec, accepted: Mapping[str, ExpertSpec]) -> None:
    """PluginError naming the field of the first problem of `spec`, among the experts `accepted` so far."""
    for field in IMPORT_PATH_FIELDS:
        path = getattr(spec, field, None)
        if path is not None and (problem := import_path_problem(path)) is not None:
            raise PluginError(f"expert {spec.name!r}: {field}: {problem}")
    unknown = [task for task in spec.trains_on.tasks if task not in SAMPLE_TASKS]
    if unknown:
        raise PluginError(
            f"expert {spec.name!r}: trains_on.tasks: unknown task(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(SAMPLE_TASKS)})"
        )
    repeated = sorted({t for t in spec.special_tokens if spec.special_tokens.count(t) > 1})
    if repeated:
        raise PluginError(f"expert {spec.name!r}: special_tokens: {', '.join(repeated)} listed twice")
    for other in accepted.values():
        shared = [token for token in spec.special_tokens if token in other.special_tokens]
        if shared:
            raise PluginError(
                f"expert {spec.name!r}: special_tokens: {', '.join(shared)} is already the token of "
                f"expert {other.name!r} ({other.source or 'runtime'}); each expert needs its own"
            )


def import_path_problem(path: str) -> str | None:
    """Why `pkg.module:name` cannot be imported, or None when it can (or cannot be told without
    running the module)."""
    module_name, _, attribute = path.partition(":")
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        return None if hasattr(loaded, attribute) else f"module {module_name!r} has no {attribute!r}"
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:  # a parent that is no package, or fails to import
        return f"module {module_name!r} cannot be found ({type(exc).__name__}: {exc})"
    if found is None:
        return f"no module named {module_name!r}"
    origin = found.origin
    if origin is None or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"module {module_name!r} cannot be read ({type(exc).__name__}: {exc})"
    names = set(_top_level_names(tree.body))
    if attribute in names or "__getattr__" in names or "*" in names:
        return None
    return f"module {module_name!r} ({origin}) defines no {attribute!r}"


def _top_level_names(body: list[ast.stmt]) -> Iterator[str]:
    """The names a module binds when it runs: definitions, assignments and imports at top level,
    including those under `if`/`try`/`with` (not inside functions or classes)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                yield from (n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                yield alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            for block in ("body", "orelse", "finalbody"):
                yield from _top_level_names(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _top_level_names(handler.body)
