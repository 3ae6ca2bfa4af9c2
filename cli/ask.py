"""`medplib ask` and `medplib ground`: one question about an image (or its marked regions), or one
phrase to segment. A volume request (`--slices`, `--out`, `--series`, a DICOM folder) goes to `volume`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import typer

from medplib.cli.common import (
    AxisOption,
    DeviceOption,
    FrameOption,
    SliceOption,
    VolumeOption,
    WindowOption,
    app,
    parse_window,
    user_errors,
)
from medplib.cli.volume import (
    BatchSizeOption,
    LargestOption,
    MinScoreOption,
    OutOption,
    ProgressOption,
    SeriesOption,
    SkipForcedOption,
    SlicesOption,
    VolumeMode,
    run_volume,
)

ImageArgument = typer.Argument(..., help="path or fsspec URI of an image (PNG, JPEG, TIFF, DICOM, NIfTI)")
ModelOption = typer.Option(
    "tiny", "--model", help="preset (tiny, small) or checkpoint folder / fsspec URI saved by save_pretrained"
)
PointOption = typer.Option(
    None, "--point", help="X,Y or X,Y,LABEL (1 positive, 0 negative); all points together mark one region"
)
BoxOption = typer.Option(None, "--box", help="X0,Y0,X1,Y1 in pixels; each box is one region")
RegionOption = typer.Option(
    None, "--region", help="binary mask image of the image's size; each is one region"
)
OverlayOption = typer.Option(None, "--overlay", help="write the image with the masks and regions to this PNG")
AnswerJsonOption = typer.Option(False, "--json", help="print the result model as JSON")
MaxNewTokensOption = typer.Option(64, "--max-new-tokens", help="answer length cap, in tokens")
TemperatureOption = typer.Option(0.0, "--temperature", help="0 decodes greedily; above 0 samples")
SeedOption = typer.Option(None, "--seed", help="seed of the sampler")
DtypeOption = typer.Option("float32", "--dtype", help="float32 or bfloat16")
QuantizationOption = typer.Option(None, "--quantization", help="int8 or int4: the LLM's linear layers")


@dataclass(frozen=True)
class CliQuery:
    """One `ask` or `ground` call as the command line gave it, whether for an image or a volume."""

    task: Literal["answer", "ground"]
    image: str
    text: str
    model: str
    device: str
    dtype: str
    quantization: str | None
    points: list[str]
    boxes: list[str]
    regions: list[str]
    slice_index: int | None
    frame: int | None
    axis: str
    window: str | None
    volume: int | None
    overlay_path: str | None
    as_json: bool
    max_new_tokens: int
    temperature: float
    seed: int | None
    volume_mode: VolumeMode

    @property
    def decoding(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed}

    def request(self) -> Any:
        """The image request as the one request type (`core.queries.Query`); region prompts from the
        options, points first (all together one region), then boxes, then masks."""
        from medplib.core.queries import Query, parse_model
        from medplib.core.regions import MaskPrompt, PointPrompt, parse_box, parse_point

        regions: list[Any] = []
        if self.points:
            clicks = [parse_point(text) for text in self.points]
            points, labels = [(x, y) for x, y, _ in clicks], [label for *_, label in clicks]
            regions.append(PointPrompt(points=points, labels=labels))
        regions += [parse_box(text) for text in self.boxes]
        regions += [MaskPrompt(source=path) for path in self.regions]
        image_options = {
            "frame": self.frame,
            "slice_index": self.slice_index,
            "axis": self.axis,
            "volume_index": self.volume,
            "window": parse_window(self.window),
        }
        fields = {"image": self.image, "text": self.text, "task": self.task, "regions": regions}
        return parse_model(Query, {**fields, "image_options": image_options}, "query")

    def load(self) -> Any:
        import medplib

        return medplib.load(self.model, device=self.device, dtype=self.dtype, quantization=self.quantization)


@app.command()
@user_errors
def ask(
    image: str = ImageArgument,
    question: str = typer.Argument(..., help="the question; '{region}' marks where each region goes"),
    model: str = ModelOption,
    point: list[str] | None = PointOption,
    box: list[str] | None = BoxOption,
    region: list[str] | None = RegionOption,
    slice_index: int | None = SliceOption,
    frame: int | None = FrameOption,
    axis: str = AxisOption,
    window: str | None = WindowOption,
    volume: int | None = VolumeOption,
    overlay_path: str | None = OverlayOption,
    as_json: bool = AnswerJsonOption,
    max_new_tokens: int = MaxNewTokensOption,
    temperature: float = TemperatureOption,
    seed: int | None = SeedOption,
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    slices: str | None = SlicesOption,
    batch_size: int = BatchSizeOption,
    series: str | None = SeriesOption,
    progress: bool | None = ProgressOption,
    quantization: str | None = QuantizationOption,
) -> None:
    """Ask a question about an image, or about regions marked on it; with --slices, about each slice."""
    run(
        CliQuery(
            task="answer",
            image=image,
            text=question,
            model=model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            points=point or [],
            boxes=box or [],
            regions=region or [],
            slice_index=slice_index,
            frame=frame,
            axis=axis,
            window=window,
            volume=volume,
            overlay_path=overlay_path,
            as_json=as_json,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            volume_mode=VolumeMode(slices=slices, batch_size=batch_size, series=series, progress=progress),
        )
    )


@app.command()
@user_errors
def ground(
    image: str = ImageArgument,
    text: str = typer.Argument(..., help="what to segment, e.g. 'the liver lesion'"),
    model: str = ModelOption,
    point: list[str] | None = PointOption,
    box: list[str] | None = BoxOption,
    region: list[str] | None = RegionOption,
    slice_index: int | None = SliceOption,
    frame: int | None = FrameOption,
    axis: str = AxisOption,
    window: str | None = WindowOption,
    volume: int | None = VolumeOption,
    overlay_path: str | None = OverlayOption,
    as_json: bool = AnswerJsonOption,
    max_new_tokens: int = MaxNewTokensOption,
    temperature: float = TemperatureOption,
    seed: int | None = SeedOption,
    device: str = DeviceOption,
    dtype: str = DtypeOption,
    slices: str | None = SlicesOption,
    batch_size: int = BatchSizeOption,
    series: str | None = SeriesOption,
    progress: bool | None = ProgressOption,
    out: str | None = OutOption,
    min_score: float | None = MinScoreOption,
    skip_forced: bool = SkipForcedOption,
    largest_component: bool = LargestOption,
    quantization: str | None = QuantizationOption,
) -> None:
    """Segment what TEXT names; always returns at least one mask. With --out or --slices, or a DICOM
    series folder, through the volume: a 3-D mask (NIfTI or DICOM SEG), its volume in mL."""
    run(
        CliQuery(
            task="ground",
            image=image,
            text=text,
            model=model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            points=point or [],
            boxes=box or [],
            regions=region or [],
            slice_index=slice_index,
            frame=frame,
            axis=axis,
            window=window,
            volume=volume,
            overlay_path=overlay_path,
            as_json=as_json,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            volume_mode=VolumeMode(
                slices=slices,
                batch_size=batch_size,
                series=series,
                progress=progress,
                out=out,
                min_score=min_score,
                skip_forced=skip_forced,
                largest_component=largest_component,
            ),
        )
    )


def run(query: CliQuery) -> None:
    if query.volume_mode.wanted(query.image):
        run_volume(query)
    else:
        run_assistant(query)


def run_assistant(query: CliQuery) -> None:
    """One image, asked through the one request type (`core.queries.Query`)."""
    request = query.request()
    assistant = query.load()
    result = assistant.answer_batch([request], **query.decoding)[0]
    if query.overlay_path:
        write_overlay(query.overlay_path, request, result)
    if query.as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(format_result(result, untrained=assistant.untrained, overlay=query.overlay_path))


def write_overlay(path: str, request: Any, result: Any) -> None:
    """The image with each region prompt outlined in white and each mask blended in its colour."""
    from medplib.core.io import load_image
    from medplib.core.masks import overlay, save_png

    pixels = load_image(request.image, **request.image_options).pixels
    height, width = pixels.shape[:2]
    marked = [prompt.to_mask(height, width) for prompt in request.regions]
    outlined = overlay(pixels, marked, [(255, 255, 255)], alpha=0.0)
    save_png(overlay(outlined, [segment.mask for segment in result.masks]), path)


def format_result(result: Any, *, untrained: bool, overlay: str | None) -> str:
    """The text `ask` and `ground` print: the answer, one line per mask, cache use and timings."""
    model = result.model
    if untrained:
        model += " (random weights: answers are meaningless until trained)"
    asked = result.query if result.task == "ground" else result.question
    rows = [("model", model), ("asked", asked), ("answer", result.text or "(empty)")]
    for index, segment in enumerate(result.masks, start=1):
        notes = [f"score {segment.score:.3f}"] if segment.score is not None else []
        notes += ["forced"] if result.seg_forced else []
        rows.append((f"mask {index}", f"{segment.summary} ({', '.join(notes)})"))
    rows.append(("cache", ", ".join(f"{kind} {use}" for kind, use in result.cache.model_dump().items())))
    rows.append(("timings", ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items())))
    if overlay:
        rows.append(("overlay", overlay))
    return "\n".join(f"{key:<8} {value}" for key, value in rows)
