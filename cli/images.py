"""`medplib inspect`: what was read from an image, without a model."""

from __future__ import annotations

from typing import Any

import typer

from medplib.cli.common import (
    AxisOption,
    FrameOption,
    SliceOption,
    VolumeOption,
    WindowOption,
    app,
    parse_window,
    user_errors,
)


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
