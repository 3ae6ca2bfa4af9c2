"""One stage, end to end: read the data, set the model up, train, save the stage folder.

`run_stage` is what `medplib train` runs in-process and what every Ray Train worker runs
(`distributed.py`), with its rank and the world size; only rank 0 writes the stage folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from medplib.core.errors import InvalidInputError, validation_message
from medplib.core.model import MedPLIBProcessor
from medplib.loading import STAGE_FILE, LoadRequest, recognise
from medplib.router.config import RouterConfig
from medplib.trainers.checkpoint import Session
from medplib.trainers.collate import Collator, Example, ExampleStore, caption_examples
from medplib.trainers.expert_training import plugin_examples
from medplib.trainers.head_refit import HeadRefit
from medplib.trainers.loop import LoopOptions, train
from medplib.trainers.restarts import Restarts, Start, choose_start
from medplib.trainers.sampling import total_steps
from medplib.trainers.stage_folder import StageModel, StageStart, load_source, prepare, save_stage
from medplib.trainers.stages import StageSpec, stage_spec


@dataclass(frozen=True)
class StageRun:
    """Everything `medplib train` is told; plain values, so Ray can ship it to workers."""

    stage: str
    model: str  # a preset name or a folder (see `stage_folder.load_source`)
    data: str
    out: str
    schedule: str = "tiny"
    expert: str | None = None
    seed: int = 0
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = True
    router: dict | None = None  # stage IV: RouterConfig fields to change (top_k, capacity_factor, ...)
    experts: tuple[str, ...] | None = None  # stage IV: the experts to compose (default: every adapter)
    # Groups of the stage's `trains` (`stages.PARAMETER_GROUPS`) this run leaves as they arrived, e.g.
    # stage IV with ("embeddings", "experts") keeps the experts' LoRA and the token embeddings as their
    # stages trained them (benchmarks/modality_expert_variants.py measures such variants).
    frozen: tuple[str, ...] = ()
    head_anchor: float | None = None  # stage IV: the head anchor's weight (None: the recipe's)
    head_refit: bool | None = None  # stage IV: False skips the recipe's head refit (None: the recipe's)
    config_options: dict | None = None  # a stage that starts from a preset: its config fields changed
    restarts: dict | None = None  # `restarts.Restarts` fields to change, e.g. {"candidates": 1}: off

    def spec(self) -> StageSpec:
        spec = stage_spec(self.stage, self.schedule, self.expert)
        overrides = {"batch_size": self.batch_size, "grad_accum": self.grad_accum}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if overrides:
            spec = spec.model_copy(update={"optim": spec.optim.model_copy(update=overrides)})
        if self.router:
            if spec.setup != "compose":
                names = ", ".join(sorted(self.router))
                raise InvalidInputError(f"router options ({names}) apply to stage 4, not stage {spec.key}")
            try:
                router = RouterConfig.model_validate(spec.router.model_dump() | self.router)
            except ValidationError as exc:
                raise InvalidInputError(f"router options: {validation_message(exc)}") from None
            spec = spec.model_copy(update={"router": router})
        if self.experts is not None and spec.setup != "compose":
            raise InvalidInputError(f"--experts applies to stage 4, not stage {spec.key}")
        if self.head_anchor is not None:
            if spec.setup != "compose":
                raise InvalidInputError(f"--head-anchor applies to stage 4, not stage {spec.key}")
            if self.head_anchor < 0:
                raise InvalidInputError(f"--head-anchor must be 0 (off) or more, got {self.head_anchor:g}")
            spec = spec.model_copy(update={"head_anchor": self.head_anchor})
        if self.head_refit is not None:
            if spec.setup != "compose":
                raise InvalidInputError(f"head_refit applies to stage 4, not stage {spec.key}")
            if self.head_refit and spec.head_refit is None:
                spec = spec.model_copy(update={"head_refit": HeadRefit()})
            elif not self.head_refit:
                spec = spec.model_copy(update={"head_refit": None})
        if self.restarts:
            try:
                restarts = Restarts.model_validate((spec.restarts or Restarts()).model_dump() | self.restarts)
            except ValidationError as exc:
                raise InvalidInputError(f"restart options: {validation_message(exc)}") from None
            spec = spec.model_copy(update={"restarts": restarts})
        if self.frozen:
            unknown = sorted(set(self.frozen) - set(spec.trains))
            if unknown:
                trains = ", ".join(spec.trains)
                raise InvalidInputError(f"frozen {', '.join(unknown)}: stage {spec.key} trains only {trains}")
            spec = spec.model_copy(update={"trains": tuple(g for g in spec.trains if g not in self.frozen)})
        return spec


def stage_examples(spec: StageSpec, examples: list[Example]) -> list[Example]:
    """The examples a stage trains on: captions for stage I, else what its sample filter accepts."""
    if spec.tasks.accepts("caption"):
        return caption_examples(examples)
    return [e for e in examples if spec.tasks.accepts(e.task, e.answer_type, e.modality, e.kind)]


def require_examples(examples: list[Example], run: StageRun, spec: StageSpec) -> None:
    if not examples:
        raise InvalidInputError(
            f"{run.data} has no training samples for stage {spec.key} ({spec.tasks.tasks})"
        )


def preflight(run: StageRun) -> None:
    """What `run_stage` refuses for its inputs, checked before Ray Train starts workers: an error
    inside a worker is retried by the `FailureConfig` as if the worker had died, and ends in a Ray
    traceback instead of one line."""
    spec = run.spec()
    recognise(LoadRequest(run.model))  # a model that is none of the forms `medplib.load` takes
    examples = stage_examples(spec, ExampleStore.open(Path(run.data), split="train").examples())
    if not examples and spec.expert is not None:
        examples = plugin_examples([spec.expert], Path(run.data))
    require_examples(examples, run, spec)


def check_out(out: Path, resume: bool) -> None:
    """Refuse to train into a folder holding another run, unless resuming it."""
    if resume or not out.exists() or not any(out.iterdir()):
        return
    if (out / STAGE_FILE).is_file():
        raise InvalidInputError(f"{out} already holds a finished stage; choose a new --out")
    raise InvalidInputError(
        f"{out} is not empty; pass --resume to continue the run in it, or choose a new --out"
    )


def device_for(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class StageOutcome:
    record: dict  # as written into `stage.json`
    prepared: StageModel  # the trained model, still set up as the stage trained it
    losses: list[float]


def run_stage(
    run: StageRun,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    session: Session | None = None,
) -> StageOutcome:
    """Train one stage and (rank 0) write its stage folder; under Ray Train, `session` keeps the
    checkpoints and says where a restarted worker group continues from."""
    out = Path(run.out)
    spec = run.spec()
    device = device or device_for(rank)
    began = time.perf_counter()
    start = None
    if spec.restarts is not None and spec.restarts.candidates > 1:
        start = probe_starts(run, spec, rank, world, device)
    seed = start.seed if start is not None else run.seed
    source, prepared, examples = set_up(run, spec, seed, device)
    experts = _composed(prepared, spec)
    if prepared.moe is not None and rank == 0 and run.progress:
        print(f"stage {spec.key} composes: {', '.join(e.name for e in experts)}", file=sys.stderr)
    processor = MedPLIBProcessor(prepared.model.config, prepared.model.tokenizer)
    options = LoopOptions(
        out=out,
        seed=seed,
        steps=run.steps,
        checkpoint_every=run.checkpoint_every,
        resume=run.resume or start is not None,
        progress=run.progress,
        rank=rank,
        world=world,
        session=session,
        start_from=start.checkpoint if start is not None else None,
    )
    result = train(prepared, examples, spec, Collator(processor), options)
    record = {
        "run": asdict(run),
        "schedule": run.schedule,
        "workers": world,
        "examples": len(examples),
        "steps": result.steps,
        # > 0: resumed (or restarted by Ray) from a checkpoint, or continued from a kept probe's
        "started_at_step": result.started_at,
        "seconds": round(time.perf_counter() - began, 1),
        "final_loss": result.losses[-1] if result.losses else None,
        "spec": spec.model_dump(mode="json"),
        "experts": [e.name for e in experts] if prepared.moe is not None else None,
        "head_refit": result.head_refit,
        "start": start.record() if start is not None else None,  # restarts: the starts probed, the kept
    }
    if rank == 0:
        save_stage(out, spec, prepared, source, record)
    if world > 1:
        # Each worker leaves a digest of its weights: synchronised workers hold identical bytes.
        digest = hashlib.blake2b(digest_size=16)
        for _, parameter in prepared.trainable_parameters():
            digest.update(parameter.detach().cpu().numpy().tobytes())
        summary = {"rank": rank, "weights": digest.hexdigest(), "losses": result.losses}
        (out / f"worker-{rank}.json").write_text(json.dumps(summary))
    return StageOutcome(record, prepared, result.losses)


def _composed(prepared: StageModel, spec: StageSpec) -> list:
    return prepared.moe.experts if prepared.moe is not None else [spec.expert] if spec.expert else []


def set_up(
    run: StageRun, spec: StageSpec, seed: int, device: torch.device
) -> tuple[StageStart, StageModel, list[Example]]:
    """The stage's source, its model set up as the stage trains it, and its training examples (the
    experts' plugin datasets included), all from `seed`."""
    examples = stage_examples(spec, ExampleStore.open(Path(run.data), split="train").examples())
    source = load_source(run.model, seed=seed, options=run.config_options)
    source.model.to(device)
    prepared = prepare(spec, source, seed=seed, experts=run.experts)
    # The experts' own datasets, registered by their plugins (`medplib_register_datasets`).
    examples += plugin_examples([e for e in _composed(prepared, spec) if e.name != "joint"], Path(run.data))
    require_examples(examples, run, spec)
    return source, prepared, examples


def probe_starts(run: StageRun, spec: StageSpec, rank: int, world: int, device: torch.device) -> Start | None:
    """`restarts.choose_start` for this stage: each probe is the stage itself from another seed,
    stopped after `probe_steps` (no start is probed when the schedule is no longer than that)."""
    restarts = spec.restarts
    examples = stage_examples(spec, ExampleStore.open(Path(run.data), split="train").examples())
    if total_steps(spec, len(examples), world, run.steps) <= restarts.probe_steps:
        return None

    def run_probe(seed: int, folder: Path) -> list[dict]:
        if rank == 0:  # a probe killed earlier starts again: its records decide, so all must be its own
            shutil.rmtree(folder, ignore_errors=True)
        _, prepared, chosen = set_up(run, spec, seed, device)
        processor = MedPLIBProcessor(prepared.model.config, prepared.model.tokenizer)
        options = LoopOptions(
            out=folder,
            seed=seed,
            steps=run.steps,
            progress=run.progress,
            rank=rank,
            world=world,
            stop_after=restarts.probe_steps,
        )
        return train(prepared, chosen, spec, Collator(processor), options).records

    start = choose_start(Path(run.out), restarts, run.seed, run_probe, rank=rank)
    if rank == 0 and run.progress:
        tried = ", ".join(f"seed {p.seed}: {p.signal}" for p in start.probes)
        signals = ", ".join(restarts.signals)
        shown = f"restarts ({signals} at the end of each probe): {tried}; kept seed {start.seed}"
        print(shown, file=sys.stderr)
    return start
