"""Stage IV's router options (`medplib train --stage 4 --router-top-k ...`): each one changes what is
trained, is recorded in stage.json, and comes back with the stage folder's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medplib.cli import app
from medplib.loading import load_model, read_record
from medplib.trainers.train import StageRun, run_stage

OPTIONS = {
    "default": {},
    "top_k": {"top_k": 2},
    "capacity": {"capacity_factor": 0.05},
    "balancing": {"load_balancing_weight": 0.5},
    "layers": {"layers": [0]},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stage_four(built_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two optimizer steps of stage IV (the first at learning rate 0) from the tiny preset per option
    set, same seed and data."""
    folders = {}
    for name, router in OPTIONS.items():
        out = tmp_path_factory.mktemp(f"stage4-{name}")
        run = StageRun(
            stage="4",
            model="tiny",
            data=str(built_dataset),
            out=str(out),
            steps=2,
            batch_size=2,
            progress=False,
            router=router or None,
        )
        run_stage(run)
        folders[name] = out
    return folders


def routed(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder).moe.routed_state_dict()


@pytest.mark.parametrize("name", ["top_k", "capacity", "balancing"])
def test_each_option_changes_the_trained_router_and_experts(stage_four: dict[str, Path], name: str) -> None:
    baseline, changed = routed(stage_four["default"]), routed(stage_four[name])
    assert baseline.keys() == changed.keys()
    assert any(not torch.equal(baseline[key], changed[key]) for key in baseline if ".router." in key)
    record = read_record(stage_four[name])["spec"]["router"]
    assert all(record[field] == value for field, value in OPTIONS[name].items())
    assert load_model(stage_four[name]).moe.config.model_dump() == record


def test_the_balancing_loss_is_trained_and_logged_only_when_weighted(stage_four: dict[str, Path]) -> None:
    def logged(name: str) -> dict:
        return json.loads((stage_four[name] / "metrics.jsonl").read_text().splitlines()[-1])

    assert logged("balancing")["balance"] > 0 and "balance" not in logged("default")


def test_routed_layers_choose_which_mlps_are_routed(stage_four: dict[str, Path]) -> None:
    assert set(load_model(stage_four["layers"]).moe.layers) == {0}
    assert len(load_model(stage_four["default"]).moe.layers) > 1
    assert read_record(stage_four["layers"])["spec"]["router"]["layers"] == [0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "2", "--router-top-k", "2"], "apply to stage 4"),
        (["--stage", "2", "--expert", "vision_language"], "--expert applies to --stage expert, not stage 2"),
        (["--stage", "4", "--routed-layers", "0,x"], "--routed-layers"),
        (["--stage", "4", "--capacity-factor", "-1"], "capacity_factor"),
        (["--stage", "4", "--load-balancing-weight", "inf"], "load_balancing_weight"),
    ],
)
def test_bad_router_options_exit_2_before_training(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--model", "tiny", "--data", ".", "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2 and message in result.stderr, result.output
