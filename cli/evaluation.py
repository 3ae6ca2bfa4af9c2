"""`medplib eval`: score a model on a dataset split as MedPLIB does, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from medplib.cli.common import DeviceOption, app, user_errors


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
    from medplib.trainers.eval.eval_markdown import headline_table
    from medplib.trainers.eval.evaluate import default_out, run_evaluation
    from medplib.trainers.eval.volumes import volume_table
    from medplib.trainers.pipeline import set_threads

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
