"""The one error hierarchy of medplib.

Every problem a user can cause is a `MedplibError` whose message names what is wrong. The CLI turns
these into one line and exit code 2, the HTTP API into a 4xx, the LangChain tools into a
`ToolException`; anything else escaping is a bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class MedplibError(Exception):
    """Base class of every error medplib raises on purpose."""


class InvalidInputError(MedplibError, ValueError):
    """The caller handed us something malformed: a bad prompt, a broken file, a wrong size."""


class UnsupportedFormatError(InvalidInputError):
    """The input is well-formed but in a format or encoding medplib cannot decode."""


class ImageTooLargeError(InvalidInputError):
    """The input exceeds a size limit (bytes, pixels, or a decompression bomb)."""


class RegionError(InvalidInputError):
    """A region prompt (point, box, shape, mask) does not fit the image it refers to."""


class CheckpointError(MedplibError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


class PluginError(MedplibError):
    """A plugin failed to import, registered an invalid spec, or clashed with another plugin."""


class CapacityError(MedplibError):
    """A request is larger than the server or model is configured to handle."""


def validation_message(exc: ValidationError) -> str:
    """pydantic's report squeezed onto one line: 'box.box: box needs x0 < x1, ...; ...'."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def describe_key_problems(source: object, problems: dict[str, list], limit: int = 50) -> str:
    """An error message that lists missing / unexpected / mismatched keys (the first `limit` of each)."""
    lines = [f"{source}: the checkpoint does not match the model"]
    for kind, keys in problems.items():
        shown = ", ".join(str(k) for k in keys[:limit])
        more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
        lines.append(f"{kind.replace('_', ' ')} ({len(keys)}): {shown}{more}")
    return "\n".join(lines)
