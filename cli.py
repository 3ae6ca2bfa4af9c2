"""The `medplib` command line.

Commands import their heavy dependencies inside their bodies, so `medplib --help` and
`medplib inspect` never load torch. Every `MedplibError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
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
    """Turn a MedplibError raised by `command` into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MedplibError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


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


@app.command()
@user_errors
def inspect(
    image: str = typer.Argument(..., help="path, fsspec URI (file://, memory://, ...) of an image"),
    slice_index: int | None = SliceOption,
    frame: int | None = FrameOption,
    axis: str = AxisOption,
    window: str | None = WindowOption,
    volume: int | None = VolumeOption,
    as_json: bool = typer.Option(False, "--json", help="print the metadata as JSON"),
) -> None:
    """Print what was read from an image: size, modality, spacing, value range."""
    from medplib.core.io import load_image

    loaded = load_image(
        image,
        frame=frame,
        slice_index=slice_index,
        axis=axis,
        volume_index=volume,
        window=parse_window(window),
    )
    if as_json:
        typer.echo(loaded.meta.model_dump_json(indent=2))
        return
    typer.echo(format_meta(loaded.meta))


def format_meta(meta: Any) -> str:
    """A human-readable block of an `ImageMeta`, one property per line, unknowns left out."""
    rows: list[tuple[str, str]] = [
        ("source", meta.source),
        ("format", meta.format),
        ("size", f"{meta.width} x {meta.height} (width x height)"),
    ]
    if meta.modality or meta.body_part:
        rows.append(("modality", " / ".join(p for p in (meta.modality, meta.body_part) if p)))
    if meta.description:
        rows.append(("description", meta.description))
    if meta.spacing:
        rows.append(("spacing", f"{meta.spacing[0]:g} x {meta.spacing[1]:g} mm (row x column)"))
    if meta.slice_thickness:
        rows.append(("thickness", f"{meta.slice_thickness:g} mm"))
    low, high = meta.value_range
    rows.append(("values", f"{meta.original_dtype}, {low:g} .. {high:g}"))
    if meta.window:
        rows.append(("window", f"{meta.window[0]:g} .. {meta.window[1]:g} mapped to 0 .. 255"))
    if meta.num_frames > 1:
        rows.append(("frame", f"{meta.frame} of {meta.num_frames}"))
    if meta.volume_shape:
        shape = " x ".join(str(n) for n in meta.volume_shape)
        rows.append(("volume", f"{shape}, {meta.axis} slice {meta.slice_index}"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="folder for the overlay PNGs and results"),
) -> None:
    """Run the end-to-end demo on real medical images from registry packages."""
    from medplib.demo import run_demo

    run_demo(out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
