"""Stage restarts on an early signal (`trainers/restarts.py`): which start is kept, and that the kept
start continues exactly as a run begun with its seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.core.errors import InvalidInputError
from medplib.trainers.restarts import PROBES, START_FILE, Probe, Restarts, best, choose_start, probe_signal
from medplib.trainers.stages import stage_spec
from medplib.trainers.train import StageRun, run_stage


def stage3(data: Path, out: Path, **changes: object) -> StageRun:
    fixed = {"stage": "3", "model": "tiny", "steps": 6, "batch_size": 2, "progress": False}
    return StageRun(data=str(data), out=str(out), **fixed, **changes)


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found = load_file(str(folder / "model" / "model.safetensors"))
    for adapter in sorted((folder / "adapters").glob("*/adapter_model.safetensors")):
        found |= {f"{adapter.parent.name}.{key}": value for key, value in load_file(str(adapter)).items()}
    return found


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_the_signal_is_the_largest_mean_of_its_parts_over_the_probes_last_steps() -> None:
    restarts = Restarts(window=2)
    records = [
        {"contrast": 0.3, "dice": 0.3},
        {"loss": 1.0, "dice": 0.2},
        {"contrast": 0.1, "dice": 0.25},
        {"contrast": 0.0},
    ]
    assert probe_signal(records, restarts) == pytest.approx(0.05)
    both = Restarts(window=2, signals=("contrast", "dice"))
    assert probe_signal(records, both) == pytest.approx(0.25)  # the masks still miss
    assert probe_signal([{"dice": 0.0}, {"contrast": 0.0}], both) == 0.0
    assert probe_signal([{"contrast": 0.3}, {"loss": 1.0}, {"loss": 2.0}], restarts) is None
    # The lowest signal is kept; a probe whose part never appeared ranks last.
    probes = [Probe(0, None, 1.0), Probe(1000, 0.29, 1.0), Probe(2000, 0.31, 1.0)]
    assert best(probes).seed == 1000
    assert best([Probe(0, None, 1.0), Probe(1000, None, 1.0)]).seed == 0


def test_the_tiny_recipe_probes_stage_iii_alone_and_bad_options_are_refused(tmp_path: Path) -> None:
    assert stage_spec("3").restarts == Restarts()
    assert all(stage_spec(stage).restarts is None for stage in ("1", "2", "4", "joint"))
    with pytest.raises(InvalidInputError, match=r"restart options.*candidates"):
        stage3(tmp_path, tmp_path / "out", restarts={"candidates": 0}).spec()
    with pytest.raises(InvalidInputError, match=r"restart options.*stride"):
        stage3(tmp_path, tmp_path / "out", restarts={"stride": 2}).spec()


def test_a_start_that_passes_is_kept_and_costs_nothing(built_dataset: Path, tmp_path: Path) -> None:
    """The run's own seed passes its probe: no other start is tried, and the stage ends bit for bit
    where a run without restarts ends."""
    passing = {"probe_steps": 3, "window": 3, "signals": ("loss",), "keep_below": 1e9}
    probed = run_stage(stage3(built_dataset, tmp_path / "probed", restarts=passing)).record
    plain = run_stage(stage3(built_dataset, tmp_path / "plain", restarts={"candidates": 1})).record
    assert plain["start"] is None
    assert [p["seed"] for p in probed["start"]["probes"]] == [0]
    assert probed["start"]["seed"] == 0
    assert [r["loss"] for r in log(tmp_path / "probed")] == [r["loss"] for r in log(tmp_path / "plain")]
    assert same(weights(tmp_path / "probed"), weights(tmp_path / "plain"))


def test_when_no_start_passes_the_lowest_is_kept_and_continued_from_its_probe(
    built_dataset: Path, tmp_path: Path
) -> None:
    failing = {"candidates": 2, "probe_steps": 3, "window": 3, "signals": ("loss",), "keep_below": -1.0}
    out = tmp_path / "probed"
    record = run_stage(stage3(built_dataset, out, restarts=failing)).record
    probes = record["start"]["probes"]
    assert [p["seed"] for p in probes] == [0, 1000]
    signals = {p["seed"]: p["signal"] for p in probes}
    assert signals[0] != signals[1000]  # the starts differ, so the choice is the data's
    kept = min(signals, key=signals.get)
    assert record["start"]["seed"] == kept and json.loads((out / START_FILE).read_text())["seed"] == kept
    # The stage's log is the kept probe's three steps, then the stage's own to the end.
    stage_log, probe_log = log(out), log(out / PROBES / f"seed-{kept}")
    assert [r["step"] for r in stage_log] == [1, 2, 3, 4, 5, 6]
    assert stage_log[:3] == probe_log
    assert record["started_at_step"] == 3
    # Only the kept probe keeps its checkpoint; the other's log stays as evidence.
    other = 1000 if kept == 0 else 0
    assert not (out / PROBES / f"seed-{other}" / "checkpoints").exists()
    assert (out / PROBES / f"seed-{other}" / "metrics.jsonl").is_file()
    # A run begun with the kept seed (no restarts) ends on the same weights. The seed moves the
    # record's seed too, so only the weights and losses are compared.
    direct = tmp_path / "direct"
    run_stage(stage3(built_dataset, direct, seed=kept, restarts={"candidates": 1}))
    assert [r["loss"] for r in log(direct)] == [r["loss"] for r in stage_log]
    assert same(weights(direct), weights(out))


def test_a_folder_that_kept_a_start_keeps_it_on_resume(built_dataset: Path, tmp_path: Path) -> None:
    """What `--resume` (and the pipeline, which always resumes) relies on after a kill past the choice."""
    failing = {"candidates": 2, "probe_steps": 3, "window": 3, "signals": ("loss",), "keep_below": -1.0}
    out = tmp_path / "probed"
    record = run_stage(stage3(built_dataset, out, restarts=failing)).record

    def must_not_probe(seed: int, folder: Path) -> list[dict]:
        raise AssertionError(f"probed seed {seed} again")

    again = choose_start(out, Restarts(**failing), 0, must_not_probe)
    assert again.seed == record["start"]["seed"]
    assert [p.seed for p in again.probes] == [0, 1000]
    assert again.checkpoint is not None and again.checkpoint.parent.parent.name == f"seed-{again.seed}"
