"""`medplib ground` and `medplib ask` on volumes: a slab or a whole volume, slice by slice.

`cli/ask.py` hands a call here when it names a volume request: `--out`, `--slices` or `--series` given,
or the input is a folder (a DICOM series).

    medplib ground ct.nii.gz "the liver" --out liver.nii.gz          # every axial slice
    medplib ground series/ "the liver" --out liver.dcm --slices 40:120   # DICOM SEG on the series
    medplib ask brain.nii.gz "Is grey matter visible?" --slices 60:80     # answers per slice, grouped
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from medplib.cli.common import parse_window

if TYPE_CHECKING:
    from medplib.cli.ask import CliQuery

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


@dataclass(frozen=True)
class VolumeMode:
    """The options that only a volume request reads; any of them (or a folder) makes one."""

    slices: str | None = None
    batch_size: int = 8
    series: str | None = None
    progress: bool | None = None
    out: str | None = None
    min_score: float | None = None
    skip_forced: bool = False
    largest_component: bool = False

    def wanted(self, image: str) -> bool:
        from medplib.core.io.dicom_series import is_folder

        return bool(self.slices or self.out or self.series or is_folder(image))


def run_volume(query: CliQuery) -> None:
    """Ground through (or ask about) the slices of a volume; print the summary or its JSON."""
    from medplib.core.errors import InvalidInputError
    from medplib.core.io import load_volume

    mode = query.volume_mode
    given = {
        "--slice": query.slice_index is not None,
        "--frame": query.frame is not None,
        "--point": bool(query.points),
        "--box": bool(query.boxes),
        "--region": bool(query.regions),
    }
    unused = [flag for flag, is_given in given.items() if is_given]
    if unused:
        raise InvalidInputError(f"{', '.join(unused)}: not for a volume request (--slices, --out, a folder)")
    if query.task == "answer" and mode.out:
        raise InvalidInputError("--out writes a mask: use it with `medplib ground`")
    volume = load_volume(query.image, volume_index=query.volume, series_uid=mode.series)
    if mode.out:
        from medplib.core.io.volume_writers import mask_format

        mask_format(mode.out, volume)  # a wrong name fails now, not after the grounding
    common = {
        "axis": query.axis,
        "slices": mode.slices,
        "batch_size": mode.batch_size,
        "window": parse_window(query.window),
    }
    assistant = query.load()
    with progress_bar(mode.progress, query.task) as progress:
        if query.task == "ground":
            result = assistant.ground_volume(
                volume,
                query.text,
                min_score=mode.min_score,
                skip_forced=mode.skip_forced,
                largest_component=mode.largest_component,
                progress=progress,
                **common,
                **query.decoding,
            )
        else:
            result = assistant.answer_volume(
                volume, query.text, progress=progress, **common, **query.decoding
            )
    written = []
    if query.task == "ground" and mode.out:
        from medplib.core.io.volume_writers import save_mask

        written.append(save_mask(mode.out, result, volume))
    if query.task == "ground" and query.overlay_path:
        from medplib.core.io.volume_writers import orthogonal_views
        from medplib.core.masks import save_png

        save_png(orthogonal_views(volume, result), query.overlay_path)
        written.append(query.overlay_path)
    if query.as_json:
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
