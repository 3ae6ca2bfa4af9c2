"""`medplib eval`: the untrained tiny preset end to end, refused partial checkpoints, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.model import build_medplib
from medplib.router.moe import MOE_FILE
from medplib.trainers.collate import ExampleStore
from medplib.trainers.eval.evaluate import load_model
from medplib.trainers.eval.gallery import GAP, panel_scale, ranked_cases
from medplib.trainers.stage_folder import ADAPTER_WEIGHTS, load_source, prepare, save_stage
from medplib.trainers.stages import stage_spec

runner = CliRunner()
FAST = ("--max-new-tokens", "4", "--no-progress")  # untrained answers are noise: a few tokens suffice


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test here runs the tiny preset, which one thread runs fastest."""


def invoke(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_eval_of_the_untrained_tiny_preset_writes_metrics_report_and_gallery(
    built_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    result = invoke("eval", "tiny", built_dataset, "--out", out, "--limit", 40, "--gallery", 2, *FAST)
    assert result.exit_code == 0, result.output
    assert "| grounding mDice |" in result.stdout and "empty mask" in result.stdout

    written = json.loads((out / "metrics.json").read_text())
    assert written["setup"]["samples_scored"] == len(written["predictions"]) == 40
    assert written["setup"]["untrained"] and written["setup"]["split"] == "test"
    assert set(written["baselines"]) == {"training_prior", "empty_mask", "whole_image_mask"}
    metrics = written["metrics"]
    assert {"bleu1", "bleu4", "f1"} <= set(metrics["parts"]["vqa"]["open"])
    assert metrics["parts"]["grounding"]["by_modality"] and metrics["counts"]["grounding"] >= 4
    # The empty mask scores 0 on every non-empty reference; the whole image overlaps each one.
    assert written["baselines"]["empty_mask"]["mdice"] == 0.0
    assert written["baselines"]["whole_image_mask"]["mdice"] > 0.0
    # The embedded dataset's MNI152 test slabs, scored in 3-D beside the slices.
    volumes = metrics["volumes"]
    assert volumes["count"] >= 8 and set(volumes["by_structure"]) >= {"grey_matter", "white_matter"}
    assert "volume samples (test slabs" in result.stdout

    report = (out / "report.md").read_text()
    for heading in ("most frequent answer / mean training mask", "empty mask", "whole-image mask"):
        assert heading in report
    for section in (
        "Grounding per structure",
        "Grounding per modality",
        "Answers per question kind",
        "Volumes",
    ):
        assert f"## {section}" in report

    pngs = sorted((out / "gallery").glob("*.png"))
    assert [p.name.split("-")[0] for p in pngs] == ["best", "best", "worst", "worst"]
    case = written["gallery"][0]
    assert f"dice{case['dice']:.3f}" in case["file"] and case["file"] in report
    example = next(e for e in ExampleStore.open(built_dataset, "test").examples() if e.id == case["id"])
    image, truth = example.request.pixels, example.targets[0]
    scale = panel_scale(image.shape[0])
    panels = np.asarray(Image.open(out / case["file"]).convert("RGB"))
    width = image.shape[1] * scale
    assert panels.shape == (image.shape[0] * scale, 3 * width + 2 * GAP, 3)
    assert np.array_equal(panels[::scale, :width:scale], image)  # left: the image as it is
    assert (panels[:, width : width + GAP] == 255).all()  # white gaps between the panels
    middle = panels[::scale, width + GAP : 2 * width + GAP : scale]
    assert not np.array_equal(middle[truth], image[truth]) and np.array_equal(middle[~truth], image[~truth])

    # A second run with a smaller gallery leaves no PNG of the first behind.
    again = invoke("eval", "tiny", built_dataset, "--out", out, "--limit", 12, "--gallery", 1, *FAST)
    assert again.exit_code == 0, again.output
    shown = {case["file"] for case in json.loads((out / "metrics.json").read_text())["gallery"]}
    assert {f"gallery/{png.name}" for png in (out / "gallery").glob("*.png")} == shown and len(shown) <= 2


def test_gallery_cases_are_never_both_best_and_worst() -> None:
    predictions = [{"id": str(i), "dice": i / 10} for i in range(3)] + [{"id": "vqa"}]
    cases = ranked_cases(predictions, 2)
    assert [(group, p["id"]) for group, _, p in cases] == [("best", "2"), ("best", "1"), ("worst", "0")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_moe_checkpoint: Path) -> dict[str, Path]:
    """Real checkpoints of each kind MODEL can name, and the weights file each keeps its keys in."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    build_medplib("tiny").save_pretrained(root / "trunk")
    spec, source = stage_spec("2"), load_source("tiny")
    save_stage(root / "stage", spec, prepare(spec, source), source, {"steps": 0})
    return {
        "trunk": root / "trunk" / "model.safetensors",
        "moe": tiny_moe_checkpoint / MOE_FILE,
        "adapter": root / "stage" / "adapters" / "vision_language" / ADAPTER_WEIGHTS,
    }


def model_folder(weights: Path, kind: str) -> Path:
    """The folder MODEL names for a checkpoint of `kind` whose weights are in `weights`."""
    return weights.parents[2] if kind == "adapter" else weights.parent


@pytest.mark.parametrize("kind", ["trunk", "moe", "adapter"])
def test_every_kind_of_checkpoint_loads_whole(checkpoints: dict[str, Path], kind: str) -> None:
    loaded = load_model(str(model_folder(checkpoints[kind], kind)), device="cpu")
    assert not loaded.untrained and not loaded.model.training


@pytest.mark.parametrize("kind", ["trunk", "moe", "adapter"])
@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_a_checkpoint_whose_weights_do_not_all_load_is_refused(
    checkpoints: dict[str, Path], built_dataset: Path, tmp_path: Path, kind: str, damage: str
) -> None:
    original = model_folder(checkpoints[kind], kind)
    folder = tmp_path / original.name
    shutil.copytree(original, folder)
    weights = folder / checkpoints[kind].relative_to(original)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    if damage == "missing":
        changed = sorted(tensors)[-1]
        del tensors[changed]
    else:
        changed = "bogus.weight"
        tensors[changed] = torch.zeros(2)
    save_file(tensors, str(weights), metadata=metadata)
    result = invoke("eval", folder, built_dataset, "--out", tmp_path / "eval", *FAST)
    assert_one_line_error(result, f"{damage} keys (1)", changed.split(".lora_")[0])
    assert not (tmp_path / "eval").exists()


def test_bad_input_exits_2_with_one_line(built_dataset: Path, tmp_path: Path) -> None:
    not_a_dataset = tmp_path / "photos"
    not_a_dataset.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "test.json").write_text("[]")
    cases = [
        (("tiny", not_a_dataset), ("not a MeCoVQA dataset",)),
        (("tiny", tmp_path / "nowhere"), ("does not exist",)),
        (("tiny", built_dataset, "--split", "dev"), ("no split 'dev'", "test, train, val")),
        (("tiny", empty), ("no samples to score",)),
        (("no-such-preset", built_dataset), ("no-such-preset", "neither a preset")),
        (("tiny", built_dataset, "--limit", 0), ("--limit must be at least 1",)),
        (("tiny", built_dataset, "--gallery", -1), ("--gallery must be at least 0",)),
    ]
    for args, fragments in cases:
        assert_one_line_error(invoke("eval", *args, "--out", tmp_path / "eval", *FAST), *fragments)
