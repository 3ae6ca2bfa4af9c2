"""What every `medplib` command shares: the Typer app, the one-line error contract, image options.

Commands import their heavy dependencies inside their bodies, so `medplib --help` and
`medplib inspect` never load torch. Every `MedplibError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from medplib.core.errors import MedplibError

app = typer.Typer(
    name="medplib",
    help="Pixel-level biomedical multimodal assistant: VQA, region questions and grounding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """Turn a MedplibError raised by `command` into a one-line message and exit code 2; so too an
    argument or a file that is not valid UTF-8."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_decodable(kwargs)
            return command(*args, **kwargs)
        except MedplibError as exc:
            fail(str(exc))
        except UnicodeError as exc:  # a file read as text that is not UTF-8, wherever it was read
            fail(f"text that is not valid UTF-8 ({exc.reason}): {exc}")

    return wrapper  # type: ignore[return-value]


def fail(message: str) -> None:
    # Some messages list things line by line (a checkpoint's missing keys): one line here.
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code=2) from None


def check_decodable(arguments: dict[str, Any]) -> None:
    """Refuse an argument the shell passed as bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which fail later, deep inside, when the text is encoded: as a tokenizer's crash)."""
    from medplib.core.errors import InvalidInputError

    for name, value in arguments.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            text = os.fspath(item) if isinstance(item, os.PathLike) else item
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    raise InvalidInputError(
                        f"{name.upper()} is not valid UTF-8 text: '{shown}'; pass text in UTF-8"
                    ) from None


SliceOption = typer.Option(None, "--slice", help="slice index into a NIfTI volume (default: the middle)")
FrameOption = typer.Option(None, "--frame", help="frame index of a multi-frame DICOM (default: 0)")
AxisOption = typer.Option("axial", "--axis", help="plane of a NIfTI slice: axial, coronal or sagittal")
WindowOption = typer.Option(
    None, "--window", help="intensity window: a preset (brain, lung, bone, ...), 'minmax', or CENTER,WIDTH"
)
VolumeOption = typer.Option(None, "--volume", help="volume index of a 4-D NIfTI")


def parse_window(text: str | None) -> str | tuple[float, float] | None:
    if text is None or "," not in text:
        return text
    from medplib.core.errors import InvalidInputError

    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(f"window {text!r} is not CENTER,WIDTH or a preset name") from None
    return center, width


DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda")
