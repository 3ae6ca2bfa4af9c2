"""Restarts on an early signal: a stage tries a few starts for a few steps and keeps one that learns.

From-scratch grounding either splits two structures of one image in its first steps or never does.
On the starts where the tiny SAM decoder keeps one mask for left and right (or grey and white), the
pair contrast (`losses.pair_contrast`) stays at its margin for the whole of stage III; on the starts
that ground it falls within 60-140 steps, and the same stage II trunk grounds with another stage III
seed (benchmarks/results/pipeline.md, "Session 11" and "Session 12"). As Dodge et al. (2020) do for
unstable fine-tuning, a stage with `StageSpec.restarts` runs each candidate start (its own seed:
initialisation, data order, dropout) for `probe_steps` steps of its full schedule and keeps the
first whose signal has fallen below `keep_below`, or else the one with the lowest. The kept start
continues from its probe's checkpoint, and resumes are exact, so the stage ends bit for bit where a
run begun with that seed ends. The run's own seed is tried first: a start that learns costs nothing
extra.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from medplib.trainers.checkpoint import latest_checkpoint
from medplib.trainers.metrics_log import LOG_FILE

START_FILE = "start.json"  # in the stage folder: the start kept, so a resumed run does not probe again
PROBES = "starts"  # the stage folder's sub-folder with one folder per probed start
SEED_STRIDE = 1000  # candidate k of a run with seed s uses seed s + k * SEED_STRIDE


class Restarts(BaseModel):
    """How a stage probes its starts (`StageSpec.restarts`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int = Field(3, ge=1)  # starts tried at most; 1 turns restarts off
    probe_steps: int = Field(140, ge=1)  # steps of the stage's schedule each start runs before it is judged
    signals: tuple[str, ...] = Field(("contrast",), min_length=1)  # the log's parts that must all fall
    window: int = Field(20, ge=1)  # the probe's last steps each signal is averaged over
    # A third of the pair contrast's margin: on a start whose grey/white (or left/right) masks stayed
    # one mask, half the pairs hold the contrast at its margin and the mean near 0.15.
    keep_below: float = 0.1


@dataclass
class Probe:
    seed: int
    signal: float | None  # None: the signal's part never appeared in the window
    seconds: float


@dataclass
class Start:
    """The start a stage continues from: its seed and (when it was probed) its probe's checkpoint."""

    seed: int
    checkpoint: Path | None = None
    probes: list[Probe] = field(default_factory=list)

    def record(self) -> dict:
        return {"seed": self.seed, "probes": [asdict(probe) for probe in self.probes]}


def candidate_seeds(seed: int, count: int) -> list[int]:
    return [seed + k * SEED_STRIDE for k in range(count)]


def probe_signal(records: Sequence[dict], restarts: Restarts) -> float | None:
    """The largest of the signals, each the mean of its part over the probe's last `window` steps;
    None when a part never appears there."""
    means = []
    for name in restarts.signals:
        values = [r[name] for r in records[-restarts.window :] if name in r]
        if not values:
            return None
        means.append(sum(values) / len(values))
    return max(means)


def passes(probe: Probe, restarts: Restarts) -> bool:
    return probe.signal is not None and probe.signal < restarts.keep_below


def best(probes: Sequence[Probe]) -> Probe:
    """The probe with the lowest signal (the first of equals); one without a signal ranks last."""
    return min(probes, key=lambda p: float("inf") if p.signal is None else p.signal)


# Runs the stage from `seed` into the folder for `probe_steps` steps, checkpointing at the last one;
# returns the steps' metrics log records.
ProbeRun = Callable[[int, Path], list[dict]]


def choose_start(out: Path, restarts: Restarts, seed: int, run_probe: ProbeRun, *, rank: int = 0) -> Start:
    """Probe the candidate starts into `out/starts/seed-N` until one passes; the kept one's probe log
    becomes the stage's first lines. A folder that already holds `start.json` keeps its choice."""
    chosen = out / START_FILE
    if chosen.is_file():
        saved = json.loads(chosen.read_text())
        folder = out / PROBES / f"seed-{saved['seed']}"
        probes = [Probe(**probe) for probe in saved["probes"]]
        return Start(saved["seed"], latest_checkpoint(folder / "checkpoints"), probes)
    probes: list[Probe] = []
    for candidate in candidate_seeds(seed, restarts.candidates):
        began = time.perf_counter()
        records = run_probe(candidate, out / PROBES / f"seed-{candidate}")
        seconds = round(time.perf_counter() - began, 1)
        probes.append(Probe(candidate, probe_signal(records, restarts), seconds))
        if passes(probes[-1], restarts):
            break
    kept = best(probes)
    folder = out / PROBES / f"seed-{kept.seed}"
    start = Start(kept.seed, latest_checkpoint(folder / "checkpoints"), probes)
    if rank == 0:
        for probe in probes:  # only the kept start's checkpoint is needed; the logs stay as evidence
            if probe.seed != kept.seed:
                shutil.rmtree(out / PROBES / f"seed-{probe.seed}" / "checkpoints", ignore_errors=True)
        shutil.copyfile(folder / LOG_FILE, out / LOG_FILE)
        chosen.write_text(json.dumps(start.record(), indent=1))
    return start
