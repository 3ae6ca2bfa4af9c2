"""The `medplib` command line.

Commands import their heavy dependencies inside their bodies, so `medplib --help` and
`medplib inspect` never load torch. Every `MedplibError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from medplib.cli_volume import (
    BatchSizeOption,
    LargestOption,
    MinScoreOption,
    OutOption,
    ProgressOption,
    SeriesOption,
    SkipForcedOption,
    SlicesOption,
    run_volume,
    wants_volume,
)
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


data_app = typer.Typer(
    help="Build, check and summarise datasets in the MeCoVQA format.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@data_app.command("build")
@user_errors
def data_build(
    out: Path = typer.Argument(..., help="folder to write the dataset to (new or empty)"),
    seed: int = typer.Option(0, "--seed", help="seed of every random choice (wordings, regions)"),
    mni_step: int = typer.Option(4, "--mni-step", help="use every N-th MNI152 slice of each plane"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a dataset this command wrote before"),
) -> None:
    """Write the embedded MeCoVQA dataset from real images and masks in registry packages."""
    import time

    from medplib.trainers.data.builder import build_dataset
    from medplib.trainers.data.stats import format_stats

    start = time.perf_counter()
    stats = build_dataset(out, seed=seed, mni_step=mni_step, overwrite=overwrite)
    typer.echo(format_stats(stats))
    typer.echo(f"\nwrote {out} in {time.perf_counter() - start:.1f} s")


@data_app.command("stats")
@user_errors
def data_stats(
    dataset: Path = typer.Argument(..., help="dataset folder, or one MeCoVQA JSON file"),
    top: int = typer.Option(20, "--top", help="how many of the most common closed answers to list"),
    as_json: bool = typer.Option(False, "--json", help="print the counts as JSON"),
) -> None:
    """Count samples per part, modality, question kind and answer, per split."""
    import json

    from medplib.trainers.data.stats import dataset_stats, format_stats

    stats = dataset_stats(dataset, top_answers=top)
    typer.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


@data_app.command("check")
@user_errors
def data_check(
    dataset: Path = typer.Argument(..., help="dataset folder, or one MeCoVQA JSON file"),
    image_root: Path | None = typer.Option(
        None, "--image-root", help="folder the image and mask paths are relative to (default: the dataset's)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Validate a MeCoVQA dataset; one line per problem, exit code 1 if there is any."""
    from medplib.trainers.data.check import check_dataset

    report = check_dataset(dataset, image_root)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        for issue in report.issues:
            typer.echo(issue.line())
        verdict = f"{report.bad_samples} bad" if report.issues else "all good"
        typer.echo(f"checked {report.samples} samples in {', '.join(report.files) or 'no files'}: {verdict}")
    if report.issues:
        raise typer.Exit(code=1)


@app.command()
@user_errors
def experts(
    as_json: bool = typer.Option(False, "--json", help="print the experts and plugin problems as JSON"),
) -> None:
    """List the registered experts (built-in and from installed plugins); report plugins that failed."""
    import json

    from medplib.core.plugins import get_experts, plugin_problems

    specs, problems = list(get_experts().values()), plugin_problems()
    if as_json:
        payload = {
            "experts": [spec.model_dump(mode="json") for spec in specs],
            "problems": [{"plugin": p.plugin, "source": p.source, "reason": p.reason} for p in problems],
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    rows = [("name", "version", "capabilities", "source")]
    rows += [(s.name, s.version, ", ".join(s.capabilities), s.source) for s in specs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        padded = (cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        typer.echo("  ".join([*padded, row[3]]))
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)


@app.command()
@user_errors
def train(
    stage: str = typer.Option(..., "--stage", help="1, 2, 3, 4, or joint (the joint-training baseline)"),
    model: str = typer.Option(..., "--model", help="a preset (tiny, ...) or the previous stage's folder"),
    data: Path = typer.Option(..., "--data", help="dataset folder in the MeCoVQA format (its train split)"),
    out: Path = typer.Option(..., "--out", help="folder for the stage: model, adapters, checkpoints, log"),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers (1: train in this process)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
    schedule: str = typer.Option("tiny", "--schedule", help="tiny (CPU, random init) or paper"),
    expert: str | None = typer.Option(None, "--expert", help="stages 2/3: train this registered expert"),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (default: by the schedule)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="micro-batch per worker"),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="micro-batches per optimizer step"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="checkpoint every N steps"),
    seed: int = typer.Option(0, "--seed", help="seed of initialisation, data order and dropout"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
    evaluate: bool = typer.Option(False, "--evaluate", help="score the trained model on the test split"),
    router_top_k: int | None = typer.Option(None, "--router-top-k", help="stage 4: experts per token"),
    capacity_factor: float | None = typer.Option(
        None, "--capacity-factor", help="stage 4: expert capacity, x the fair share of tokens"
    ),
    load_balancing_weight: float | None = typer.Option(
        None, "--load-balancing-weight", help="stage 4: weight of the router's load-balancing loss"
    ),
    routed_layers: str | None = typer.Option(
        None, "--routed-layers", help="stage 4: decoder layers to route, e.g. 0,2 (default: all)"
    ),
) -> None:
    """Train one stage of the MedPLIB recipe (I align, II and III experts, IV mixture of experts)."""
    from medplib.trainers.distributed import launch
    from medplib.trainers.pipeline import evaluate_stage, set_threads
    from medplib.trainers.train import StageRun, check_out

    set_threads(threads)
    check_out(out, resume)
    run = StageRun(
        stage=stage,
        model=model,
        data=str(data),
        out=str(out),
        schedule=schedule,
        expert=expert,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        checkpoint_every=checkpoint_every,
        resume=resume,
        router=router_options(router_top_k, capacity_factor, load_balancing_weight, routed_layers),
    )
    run.spec()  # an unknown stage, schedule, expert or router option fails here, before any data is read
    record = launch(run, workers)
    typer.echo(f"stage {record['stage']} ({record['title']}): {record['steps']} steps, {record['seconds']} s")
    if evaluate:
        import json

        metrics = evaluate_stage(out, data)
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}, indent=1))


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
DeviceOption = typer.Option("auto", "--device", help="auto, cpu or cuda")
DtypeOption = typer.Option("float32", "--dtype", help="float32 or bfloat16")
QuantizationOption = typer.Option(None, "--quantization", help="int8 or int4: the LLM's linear layers")


def router_options(
    top_k: int | None, capacity_factor: float | None, load_balancing_weight: float | None, layers: str | None
) -> dict | None:
    """The RouterConfig fields `medplib train` was given (None: the stage's own)."""
    from medplib.core.errors import InvalidInputError

    options: dict[str, Any] = {
        "top_k": top_k,
        "capacity_factor": capacity_factor,
        "load_balancing_weight": load_balancing_weight,
    }
    if layers is not None:
        try:
            options["layers"] = [int(part) for part in layers.split(",")]
        except ValueError:
            raise InvalidInputError(
                f"--routed-layers {layers!r} is not a list of layer numbers like 0,2"
            ) from None
    options = {name: value for name, value in options.items() if value is not None}
    return options or None


@app.command()
@user_errors
def ask(
    image: str = typer.Argument(..., help="path or fsspec URI of an image (PNG, JPEG, TIFF, DICOM, NIfTI)"),
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
    if wants_volume(image, locals()):
        return run_volume("answer", **locals())
    run_assistant("answer", **locals())


@app.command()
@user_errors
def ground(
    image: str = typer.Argument(..., help="path or fsspec URI of an image (PNG, JPEG, TIFF, DICOM, NIfTI)"),
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
    options = {k: v for k, v in locals().items() if k != "text"}
    run = run_volume if wants_volume(image, options) else run_assistant
    run("ground", question=text, **options)


def run_assistant(task: str, *, image: str, question: str, **options: Any) -> None:
    """`ask` and `ground`: region prompts from the options (points first, then boxes, then masks)."""
    from medplib.core.regions import MaskPrompt, PointPrompt, parse_box, parse_point

    regions: list[Any] = []
    if options["point"]:
        clicks = [parse_point(text) for text in options["point"]]
        points, labels = [(x, y) for x, y, _ in clicks], [label for *_, label in clicks]
        regions.append(PointPrompt(points=points, labels=labels))
    regions += [parse_box(text) for text in options["box"] or ()]
    regions += [MaskPrompt(source=path) for path in options["region"] or ()]
    image_options = {
        "frame": options["frame"],
        "slice_index": options["slice_index"],
        "axis": options["axis"],
        "volume_index": options["volume"],
        "window": parse_window(options["window"]),
    }
    decoding = {
        "max_new_tokens": options["max_new_tokens"],
        "temperature": options["temperature"],
        "seed": options["seed"],
    }
    import medplib

    assistant = medplib.load(
        options["model"],
        device=options["device"],
        dtype=options["dtype"],
        quantization=options["quantization"],
    )
    method = assistant.ground if task == "ground" else assistant.answer
    result = method(image, question, regions, image_options=image_options, **decoding)
    if options["overlay_path"]:
        write_overlay(options["overlay_path"], image, image_options, regions, result)
    if options["as_json"]:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(format_result(result, untrained=assistant.untrained, overlay=options["overlay_path"]))


def write_overlay(
    path: str, image: str, image_options: dict[str, Any], regions: list[Any], result: Any
) -> None:
    """The image with each region prompt outlined in white and each mask blended in its colour."""
    from medplib.core.io import load_image
    from medplib.core.masks import overlay, save_png

    pixels = load_image(image, **image_options).pixels
    height, width = pixels.shape[:2]
    marked = [prompt.to_mask(height, width) for prompt in regions]
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


convert_app = typer.Typer(help="Convert foreign checkpoints into medplib checkpoints.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("medplib")
@user_errors
def convert_medplib(
    source: Path = typer.Argument(..., help="MedPLIB's released checkpoint folder (e.g. MedPLIB-7b-2e)"),
    out: Path = typer.Argument(..., help="new folder for the converted checkpoint"),
    dtype: str = typer.Option("keep", "--dtype", help="keep, bfloat16 or float32 (gates stay float32)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest output shard, e.g. 5GB or 500MB"),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="MedPLIB's tokenizer folder (default: SOURCE)"
    ),
    vision_tower: Path | None = typer.Option(
        None, "--vision-tower", help="CLIP tower folder (default: the config's)"
    ),
    sam_decoder_heads: int = typer.Option(
        8, "--sam-decoder-heads", help="SAM mask decoder heads (MedPLIB: 8)"
    ),
    experts: str = typer.Option(
        "dense", "--experts", help="dense (exact), or lora: shared MLP + rank-R deltas"
    ),
    rank: int | None = typer.Option(None, "--rank", help="rank R of each expert's delta with --experts lora"),
) -> None:
    """Convert MedPLIB's released checkpoint, shard by shard, into a medplib checkpoint (compat: medplib)."""
    from medplib.router.convert_medplib import convert_medplib as convert
    from medplib.router.convert_medplib import parse_dtype, parse_size

    report = convert(
        source,
        out,
        dtype=parse_dtype(dtype),
        shard_size=parse_size(shard_size),
        tokenizer=tokenizer,
        vision_tower=vision_tower,
        sam_decoder_heads=sam_decoder_heads,
        experts=experts,
        rank=rank,
    )
    if report.factorization_error:
        worst = max(report.factorization_error, key=report.factorization_error.get)
        typer.echo(
            f"rank-{rank} experts: largest relative error {report.factorization_error[worst]:.4f} ({worst})"
        )
    dropped, gigabytes = len(report.dropped_keys), report.bytes_written / 1e9
    typer.echo(
        f"converted {report.source_keys} keys ({dropped} dropped) into {report.written_keys} tensors, "
        f"{gigabytes:.3f} GB in {len(report.shards)} shard(s), {report.seconds:.1f} s: {out}"
    )


@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="preset, checkpoint folder or stage II / III folder"),
    out: Path = typer.Argument(..., help="new folder for the quantised checkpoint"),
    mode: str = typer.Option("int8", "--mode", help="int8 or int4: the LLM's and CLIP's linear layers"),
) -> None:
    """Write a quantised checkpoint (CPU) that `medplib.load(OUT)` and every command load as saved."""
    from medplib.core.assistant import load
    from medplib.core.model.quantized_checkpoint import save_quantized

    names = save_quantized(load(model, device="cpu").model, out, mode)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    typer.echo(f"{len(names)} linear layers at {mode}, {size:.1f} MB: {out}")


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help="preset (tiny, small, medplib-7b), checkpoint or fsspec URI"),
    as_json: bool = typer.Option(False, "--json", help="print the model's description as JSON"),
    dtype: str = typer.Option("float32", "--dtype", help="weights' dtype for the bytes column"),
    quantization: str | None = typer.Option(None, "--quantization", help="int8 or int4, for the bytes"),
) -> None:
    """Describe a model without loading its weights: components, parameters and bytes, tokens, experts."""
    from medplib.core.model_info import format_info, model_info

    described = model_info(model, dtype=dtype, quantization=quantization)
    typer.echo(described.model_dump_json(indent=2) if as_json else format_info(described))


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def pipeline(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="dataset folder in the MeCoVQA format"),
    out: Path = typer.Option(..., "--out", help="folder for every stage, report.json and report.md"),
    preset: str = typer.Option("tiny", "--preset", help="model preset the pipeline starts from"),
    schedule: str | None = typer.Option(None, "--schedule", help="tiny or paper (default: tiny for tiny)"),
    seed: list[int] = typer.Option(
        [0],
        "--seed",
        help="seed(s) of initialisation, data order and dropout: --seed 0 1 2 runs each in OUT/seed-N",
    ),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per process"),
    sequential: bool = typer.Option(False, "--sequential", help="train the joint baseline after, not beside"),
    joint: bool = typer.Option(True, "--joint/--no-joint", help="also train the joint-training baseline"),
) -> None:
    """Run stages I -> IV and the joint baseline, score each on the test split, write the report."""
    from medplib.core.errors import InvalidInputError
    from medplib.trainers.pipeline import run_pipeline, run_seeds
    from medplib.trainers.report import format_seed_table, format_table

    if not all(arg.isdigit() for arg in ctx.args):
        raise InvalidInputError(f"unexpected arguments {ctx.args}; more seeds follow --seed as integers")
    seeds = [*seed, *map(int, ctx.args)]
    schedule = schedule or ("tiny" if preset == "tiny" else "paper")
    options = {"preset": preset, "schedule": schedule, "threads": threads, "parallel": not sequential}
    options["joint"] = joint
    if len(seeds) == 1:
        typer.echo(format_table(run_pipeline(data, out, seed=seeds[0], **options)))
    else:
        typer.echo(format_seed_table(run_seeds(data, out, seeds, **options)))
    typer.echo(f"\nwrote {out / 'report.json'}")


@app.command("eval")
@user_errors
def evaluate_model(
    model: str = typer.Argument(
        ..., help="preset (tiny: random weights), checkpoint folder / fsspec URI, or a stage folder"
    ),
    data: Path = typer.Argument(..., help="dataset folder in the MeCoVQA format"),
    split: str = typer.Option("test", "--split", help="the split to score"),
    out: Path | None = typer.Option(
        None, "--out", help="folder for metrics.json, report.md and gallery/ (default: eval-MODEL-SPLIT)"
    ),
    limit: int | None = typer.Option(None, "--limit", help="score N samples spread evenly over the split"),
    gallery: int = typer.Option(4, "--gallery", help="PNGs of the N best and the N worst grounding cases"),
    batch_size: int = typer.Option(16, "--batch-size", help="samples generated together"),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="answer length cap, in tokens (default: as the pipeline scores)"
    ),
    device: str = DeviceOption,
    seed: int = typer.Option(0, "--seed", help="seed of a preset's random weights"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="progress bar on stderr (default: when it is a terminal)"
    ),
) -> None:
    """Score a model on a dataset split as MedPLIB does, against trivial baselines; write a report."""
    from medplib.trainers.eval_report import headline_table
    from medplib.trainers.evaluation import default_out, run_evaluation
    from medplib.trainers.pipeline import set_threads
    from medplib.trainers.volume_eval import volume_table

    set_threads(threads)
    out = out or default_out(model, split)
    result = run_evaluation(
        model,
        data,
        out,
        split=split,
        limit=limit,
        gallery=gallery,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        seed=seed,
        progress=progress,
    )
    typer.echo(headline_table(result))
    if result["metrics"].get("volumes"):
        typer.echo("\n" + volume_table(result["metrics"]["volumes"])[0])
    typer.echo(
        f"\nwrote {out / 'metrics.json'}, {out / 'report.md'} and {len(result['gallery'])} gallery PNGs"
    )


@app.command()
@user_errors
def plot(
    log: Path = typer.Argument(..., help="a stage's metrics.jsonl"),
    out: Path | None = typer.Option(None, "--out", help="PNG to write (default: beside the log)"),
) -> None:
    """Plot a training metrics log (loss parts, learning rate, throughput, routing shares) to PNG."""
    from medplib.trainers.plot import plot_log

    typer.echo(f"wrote {plot_log(log, out or log.with_suffix('.png'))}")


@app.command()
@user_errors
def serve(
    model: str | None = typer.Option(None, "--model", help="preset or checkpoint (default: the config's)"),
    config: Path | None = typer.Option(
        None, "--config", help="serve YAML, e.g. examples/serve/cpu.yaml or examples/serve/gpu-cluster.yaml"
    ),
    host: str | None = typer.Option(None, "--host", help="address to bind (default 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="HTTP port (default 8000)"),
    address: str | None = typer.Option(
        None, "--address", help="join this Ray cluster (auto, HOST:6379, ray://...); default: start one here"
    ),
    detach: bool = typer.Option(False, "--detach", help="with --address: deploy, then return"),
) -> None:
    """Serve VQA, region VQA and grounding over HTTP with Ray Serve, until Ctrl-C."""
    from medplib.agents.serve_config import ServeConfig

    if detach and address is None:
        from medplib.core.errors import InvalidInputError

        raise InvalidInputError("--detach needs --address: a Ray cluster started here ends with this command")
    settings = ServeConfig.from_yaml(config) if config is not None else ServeConfig()
    http = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    settings = settings.with_overrides(**({"model": model} if model else {}), http=http)
    import signal
    import threading

    import ray
    from ray import serve as ray_serve

    from medplib.agents.app import deploy

    url = deploy(settings, address=address, ray_init={"include_dashboard": False} if address is None else {})
    key = "yes" if settings.resolved_api_key() else "none"
    typer.echo(f"medplib serving {settings.model} at {url} (API key: {key}; docs at {url}/docs)")
    if detach:
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):  # a timed wait, so Ctrl-C is seen at once
            pass
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("shutting down", err=True)
        if address is None:  # the cluster is ours: take Serve down with it
            ray_serve.shutdown()
        else:
            ray_serve.delete(settings.app_name)
        ray.shutdown()


@app.command()
@user_errors
def ui(
    model: str = typer.Option("tiny", "--model", help="preset or checkpoint folder / URI"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind"),
    port: int = typer.Option(7860, "--port", help="HTTP port"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    max_body_mb: int = typer.Option(32, "--max-body-mb", help="largest request (an upload is sent in it)"),
) -> None:
    """Serve the web page and the /v1 API with the model in this process (no Ray), until Ctrl-C.
    Set MEDPLIB_API_KEY to make the API ask for a key."""
    from medplib.agents.ui.server import serve_ui

    serve_ui(model, host=host, port=port, device=device, max_body_bytes=max_body_mb << 20)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
