"""`medplib train`, `medplib pipeline` and `medplib plot`: the MedPLIB recipe's stages and their logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medplib.cli.common import app, user_errors


@app.command()
@user_errors
def train(
    stage: str = typer.Option(
        ..., "--stage", help="1, 2, 3, 4 (the paper's), expert (one --expert), or joint (the baseline)"
    ),
    model: str = typer.Option(..., "--model", help="a preset (tiny, ...) or the previous stage's folder"),
    data: Path = typer.Option(..., "--data", help="dataset folder in the MeCoVQA format (its train split)"),
    out: Path = typer.Option(..., "--out", help="folder for the stage: model, adapters, checkpoints, log"),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers (1: train in this process)"),
    max_failures: int = typer.Option(
        3, "--max-failures", help="--workers: restarts after a worker dies (-1: no limit)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in --out"),
    schedule: str = typer.Option("tiny", "--schedule", help="tiny (CPU, random init) or paper"),
    expert: str | None = typer.Option(None, "--expert", help="stage expert: the registered expert to train"),
    experts: str | None = typer.Option(
        None, "--experts", help="stage 4: experts to compose, e.g. a,b,c (default: every adapter in --model)"
    ),
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
    head_anchor: float | None = typer.Option(
        None, "--head-anchor", help="stage 4: weight keeping plugin heads' input states (0: off; default 5)"
    ),
    restarts: int | None = typer.Option(
        None, "--restarts", help="starts probed before one is kept (1: off; default: stage 3 probes 3)"
    ),
    config_option: list[str] = typer.Option(
        [],
        "--option",
        help="a preset's config field changed, KEY=VALUE (repeatable), e.g. --option region_appearance=true",
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
        experts=tuple(name.strip() for name in experts.split(",") if name.strip()) if experts else None,
        head_anchor=head_anchor,
        config_options=config_options(config_option),
        restarts={"candidates": restarts} if restarts is not None else None,
    )
    run.spec()  # an unknown stage, schedule, expert or router option fails here, before any data is read
    record = launch(run, workers, max_failures)
    typer.echo(f"stage {record['stage']} ({record['title']}): {record['steps']} steps, {record['seconds']} s")
    if evaluate:
        import json

        metrics = evaluate_stage(out, data)
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "predictions"}, indent=1))


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


def config_options(pairs: list[str]) -> dict | None:
    """`--option KEY=VALUE` pairs as config fields; a VALUE that reads as JSON (true, 1.5, null) is
    that value, any other is the string itself (glove-6b-50d)."""
    import json

    from medplib.core.errors import InvalidInputError
    from medplib.core.model.presets import check_options

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--option {pair!r} is not KEY=VALUE, e.g. region_appearance=true")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    check_options(options)
    return options or None


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
    config_option: list[str] = typer.Option(
        [],
        "--option",
        help="a preset's config field changed, KEY=VALUE (repeatable), e.g. --option region_appearance=true",
    ),
) -> None:
    """Run stages I -> IV and the joint baseline, score each on the test split, write the report."""
    from medplib.core.errors import InvalidInputError
    from medplib.trainers.eval.pipeline_report import format_seed_table, format_table
    from medplib.trainers.pipeline import run_pipeline, run_seeds

    if not all(arg.isdigit() for arg in ctx.args):
        raise InvalidInputError(f"unexpected arguments {ctx.args}; more seeds follow --seed as integers")
    seeds = [*seed, *map(int, ctx.args)]
    schedule = schedule or ("tiny" if preset == "tiny" else "paper")
    options = {"preset": preset, "schedule": schedule, "threads": threads, "parallel": not sequential}
    options["joint"] = joint
    options["config_options"] = config_options(config_option)
    if len(seeds) == 1:
        typer.echo(format_table(run_pipeline(data, out, seed=seeds[0], **options)))
    else:
        typer.echo(format_seed_table(run_seeds(data, out, seeds, **options)))
    typer.echo(f"\nwrote {out / 'report.json'}")


@app.command()
@user_errors
def plot(
    log: Path = typer.Argument(..., help="a stage's metrics.jsonl"),
    out: Path | None = typer.Option(None, "--out", help="PNG to write (default: beside the log)"),
) -> None:
    """Plot a training metrics log (loss parts, learning rate, throughput, routing shares) to PNG."""
    from medplib.trainers.eval.training_plot import plot_log

    typer.echo(f"wrote {plot_log(log, out or log.with_suffix('.png'))}")
