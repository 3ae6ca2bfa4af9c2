"""`medplib data build|stats|check` and `medplib demo`: the embedded dataset and the end-to-end demo."""

from __future__ import annotations

from pathlib import Path

import typer

from medplib.cli.common import app, user_errors


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
