"""`medplib ground` and `medplib ask` on volumes: a slab or a whole volume, slice by slice.

`cli.py` hands a call here when it names a volume request: `--out`, `--slices` or `--series` given,
or the input is a folder (a DICOM series).

    medplib ground ct.nii.gz "the liver" --out liver.nii.gz          # every axial slice
    medplib ground series/ "the liver" --out liver.dcm --slices 40:120   # DICOM SEG on the series
    medplib ask brain.nii.gz "Is grey matter visible?" --slices 60:80     # answers per slice, grouped
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

SlicesOption = typer.Option(
    None, "--slices", help="volume mode: slice indices START:STOP along --axis (default: every slice)"
)
OutOption = typer.Option(
    None, "--out", help="volume mode: write the 3-D mask, .nii.gz/.nii (input grid) or .dcm (DICOM SEG)"
)
BatchSizeOption = typer.Option(8, "--batch-size", help="volume mode: slices run as one batch")
MinScoreOption = typer.Option(
    None, "--min-score", help="volume mode: leave slices whose predicted IoU is below this empty"
)
SkipForcedOption = typer.Option(
    False, "--skip-forced", help="volume mode: leave slices empty where the model gave no <SEG> itself"
)
LargestOption = typer.Option(
    False, "--largest-component", help="volume mode: keep the largest 3-D connected part of the mask"
)
SeriesOption = typer.Option(None, "--series", help="SeriesInstanceUID, for a folder holding several")
ProgressOption = typer.Option(
    None, "--progress/--no-progress", help="progress bar on stderr (default: when it is a terminal)"
)


def wants_volume(image: str, options: dict[str, Any]) -> bool:
    from medplib.core.io.dicom_series import is_folder

    return bool(options.get("slices") or options.get("out") or options.get("series") or is_folder(image))


def run_volume(task: str, *, image: str, question: str, **options: Any) -> None:
    """Ground through (or ask about) the slices of a volume; print the summary or its JSON."""
    from medplib.core.errors import InvalidInputError
    from medplib.core.io import load_volume

    flags = {
        "slice_index": "--slice",
        "frame": "--frame",
        "point": "--point",
        "box": "--box",
        "region": "--region",
    }
    unused = [flag for name, flag in flags.items() if options.get(name)]
    if unused:
        raise InvalidInputError(f"{', '.join(unused)}: not for a volume request (--slices, --out, a folder)")
    if task == "answer" and options.get("out"):
        raise InvalidInputError("--out writes a mask: use it with `medplib ground`")
    volume = load_volume(image, volume_index=options.get("volume"), series_uid=options.get("series"))
    if options.get("out"):
        from medplib.core.io.volume_writers import mask_format

        mask_format(options["out"], volume)  # a wrong name fails now, not after the grounding
    decoding = {k: options[k] for k in ("max_new_tokens", "temperature", "seed")}
    common = {
        "axis": options["axis"],
        "slices": options.get("slices"),
        "batch_size": options["batch_size"],
        "window": parse_window(options.get("window")),
    }
    import medplib

    assistant = medplib.load(options["model"], device=options["device"], dtype=options["dtype"])
    with progress_bar(options.get("progress"), task) as progress:
        if task == "ground":
            result = assistant.ground_volume(
                volume,
                question,
                min_score=options.get("min_score"),
                skip_forced=options.get("skip_forced", False),
                largest_component=options.get("largest_component", False),
                progress=progress,
                **common,
                **decoding,
            )
        else:
            result = assistant.answer_volume(volume, question, progress=progress, **common, **decoding)
    written = []
    if task == "ground" and options.get("out"):
        from medplib.core.io.volume_writers import save_mask

        written.append(save_mask(options["out"], result, volume))
    if task == "ground" and options.get("overlay_path"):
        from medplib.core.masks import orthogonal_views, save_png

        save_png(orthogonal_views(volume, result), options["overlay_path"])
        written.append(options["overlay_path"])
    if options["as_json"]:
        typer.echo(result.model_dump_json(indent=2))
        return
    if assistant.untrained:
        typer.echo(f"model: {assistant.name} (random weights: answers are meaningless until trained)")
    typer.echo(result.summary())
    for path in written:
        typer.echo(f"wrote {path}")


@contextlib.contextmanager
def progress_bar(enabled: bool | None, task: str) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar fed by the volume drivers' (done, total) callback, or None when not shown."""
    if not (enabled if enabled is not None else sys.stderr.isatty()):
        yield None
        return
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="slice", desc=task, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def parse_window(text: str | None) -> str | tuple[float, float] | None:
    if text is None or "," not in text:
        return text
    from medplib.core.errors import InvalidInputError

    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInputError(f"window {text!r} is not CENTER,WIDTH or a preset name") from None
    return center, width
