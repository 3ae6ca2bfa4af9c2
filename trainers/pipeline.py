"""`medplib pipeline`: stages I -> II -> III -> IV and the joint baseline, each scored on the test split.

Stage I runs first; then the expert chain (II, III, IV) runs in this process while the joint
baseline, which needs only stage I, trains in a second process beside it. On two cores that halves
the wall time, and one thread per process is also what these small matrices run fastest with (a
second OpenMP thread mostly waits on the other). The joint baseline gets the same budget as the
MoE after alignment: as many optimizer steps as stages II, III and IV together.

Every stage writes its folder under OUT (`stage1/`, `stage2/`, `stage3/`, `stage4/`, `joint/`) with
its model, adapters, metrics log, `eval.json` and `metrics.png`; OUT gets `report.json` and
`report.md`. A finished stage folder is reused and an unfinished one resumed from its last
checkpoint, so a killed pipeline continues where it stopped. With several seeds (`run_seeds`) each
seed's pipeline runs in OUT/seed-N, one after the other, and OUT's report holds every seed's numbers
with their mean and worst.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from medplib.core.errors import InvalidInputError
from medplib.core.model import MedPLIBForCausalLM, MedPLIBProcessor
from medplib.loading import STAGE_FILE, load_model, read_record
from medplib.trainers.collate import Collator, Example, ExampleStore
from medplib.trainers.eval.pipeline_report import (
    build_report,
    build_seed_report,
    format_seed_table,
    format_table,
)
from medplib.trainers.eval.scoring import evaluate, trivial_baselines
from medplib.trainers.sampling import total_steps
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import StageRun, run_stage, stage_examples

EVAL_FILE = "eval.json"
CHAIN = ("1", "2", "3", "4")
FOLDERS = {"1": "stage1", "2": "stage2", "3": "stage3", "4": "stage4", "joint": "joint"}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def score(model: MedPLIBForCausalLM, test: list[Example]) -> dict:
    return evaluate(model, test, Collator(MedPLIBProcessor(model.config, model.tokenizer)))


def evaluate_stage(folder: Path, data: Path) -> dict:
    """Score a finished stage folder on the test split; writes `eval.json` beside its model."""
    metrics = score(load_model(folder).model, ExampleStore.open(data, split="test").examples())
    (folder / EVAL_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


def planned_steps(stage: str, schedule: str, train: list[Example]) -> int:
    """The optimizer steps a stage takes by its schedule on this training split (one worker)."""
    spec = stage_spec(stage, schedule)
    return total_steps(spec, len(stage_examples(spec, train)), world=1, steps=None)


def run_and_score(run: StageRun, test_data: str, threads: int | None) -> dict:
    """Train one stage (or reuse its finished folder), score it, and return its record with metrics."""
    set_threads(threads)
    folder = Path(run.out)
    if (folder / STAGE_FILE).is_file():  # finished earlier: `reused`, its `seconds` are that run's
        record = read_record(folder)
        check_reusable(folder, record, run)
        if (folder / EVAL_FILE).is_file():
            metrics = json.loads((folder / EVAL_FILE).read_text())
        else:
            metrics = evaluate_stage(folder, Path(test_data))
        return record | {"metrics": metrics, "reused": True}
    outcome = run_stage(replace(run, resume=True))
    metrics = score(outcome.prepared.model, ExampleStore.open(Path(test_data), split="test").examples())
    (folder / EVAL_FILE).write_text(json.dumps(metrics, indent=1))
    _plot(folder)
    return read_record(folder) | {"metrics": metrics, "reused": False}


def check_reusable(folder: Path, record: dict, run: StageRun) -> None:
    """Refuse a finished stage (its `stage.json` `record`) trained with another seed, schedule or config
    options: two pipelines given one --out would otherwise report the first one's stages as the second's."""
    trained = record.get("run", {})
    wanted = {"seed": run.seed, "schedule": run.schedule, "config_options": run.config_options}
    found = {"seed": trained.get("seed", run.seed), "schedule": trained.get("schedule", run.schedule)}
    found["config_options"] = trained.get("config_options")  # a record from before the field: none
    if found != wanted:

        def says(values: dict) -> str:
            options = values["config_options"]
            extra = f" with config options {options}" if options else " without config options"
            return f"seed {values['seed']} and schedule {values['schedule']!r}{extra}"

        raise InvalidInputError(
            f"{folder} holds a stage trained with {says(found)}; this pipeline runs {says(wanted)}: "
            "choose another --out"
        )


def _plot(folder: Path) -> None:
    from medplib.trainers.eval.training_plot import plot_log

    plot_log(folder / "metrics.jsonl", folder / "metrics.png")


def run_pipeline(
    data: Path,
    out: Path,
    *,
    preset: str = "tiny",
    schedule: str = "tiny",
    seed: int = 0,
    threads: int | None = 1,
    parallel: bool = True,
    progress: bool = True,
    joint: bool = True,
    config_options: dict | None = None,
) -> dict:
    """Run I -> IV and (`joint`) the joint baseline into `out`; returns the report (also written to disk).

    Without the joint baseline the pipeline costs about half the CPU time; the report then has no
    joint-training row and compares the MoE with the experts only. `config_options` change the preset's
    config fields (`build_config`); stage I builds the model with them and every later stage inherits
    them through its folder."""
    began = time.perf_counter()
    load_at_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    train = ExampleStore.open(data, split="train").examples()
    test = ExampleStore.open(data, split="test").examples()

    def stage_run(stage: str, source: str) -> StageRun:
        return StageRun(
            stage=stage,
            model=source,
            data=str(data),
            out=str(out / FOLDERS[stage]),
            schedule=schedule,
            seed=seed,
            checkpoint_every=50,
            progress=progress,
        )

    first = replace(stage_run("1", preset), config_options=config_options or None)
    records = {"1": run_and_score(first, str(data), threads)}
    joint_steps = sum(planned_steps(stage, schedule, train) for stage in ("2", "3", "4"))
    baseline = replace(stage_run("joint", str(out / FOLDERS["1"])), steps=joint_steps, progress=False)
    pool = None
    if parallel and joint:
        # spawn, not fork: the parent's torch thread pool and Ray/tokenizer state must not be copied.
        pool = multiprocessing.get_context("spawn").Pool(1)
        pending = pool.apply_async(run_and_score, (baseline, str(data), threads))
    for previous, stage in itertools.pairwise(CHAIN):
        records[stage] = run_and_score(stage_run(stage, str(out / FOLDERS[previous])), str(data), threads)
    if pool is not None:
        records["joint"] = pending.get()
        pool.close()
        pool.join()
    elif joint:
        records["joint"] = run_and_score(baseline, str(data), threads)
    report = build_report(
        records,
        trivial_baselines(train, test),
        wall_minutes=(time.perf_counter() - began) / 60,
        preset=preset,
        schedule=schedule,
        threads=threads,
        parallel=parallel,
        joint=joint,
        cpus=os.cpu_count(),
        seed=seed,
        config_options=config_options or {},
        # Other jobs on the machine slow the pipeline: the 1/5/15-minute load averages, start and end.
        load_average={"start": load_at_start, "end": os.getloadavg()},
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(format_table(report) + "\n")
    return report


def run_seeds(data: Path, out: Path, seeds: list[int], **options: object) -> dict:
    """`run_pipeline` once per seed into OUT/seed-N; OUT's report holds each seed, the mean and the worst."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise InvalidInputError(f"seeds must be distinct and at least one, got {seeds}")
    reports = {seed: run_pipeline(data, out / f"seed-{seed}", seed=seed, **options) for seed in seeds}
    report = build_seed_report(reports)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(format_seed_table(report) + "\n")
    return report
