"""Scoring on a split, the trivial baselines, the pipeline's report and the metrics plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medplib.core.errors import InvalidInputError
from medplib.core.masks import Mask
from medplib.core.model import MedPLIBProcessor, build_medplib
from medplib.trainers.collate import Collator, ExampleStore
from medplib.trainers.eval.metrics import mask_scores, token_scores
from medplib.trainers.eval.pipeline_report import (
    GOALS,
    SWAP_GOAL_NAMES,
    build_report,
    build_seed_report,
    format_seed_table,
    format_table,
)
from medplib.trainers.eval.scoring import evaluate, trivial_baselines
from medplib.trainers.eval.training_plot import plot_log


@pytest.fixture(scope="module")
def splits(built_dataset: Path):
    return (
        ExampleStore.open(built_dataset, split="train").examples(),
        ExampleStore.open(built_dataset, split="test").examples(),
    )


def test_evaluate_generates_and_scores_every_part(splits) -> None:
    _, test = splits
    chosen = [
        e for task in ("vqa", "region_vqa", "grounding") for e in [x for x in test if x.task == task][:2]
    ]
    torch.manual_seed(0)
    model = build_medplib("tiny")
    metrics = evaluate(
        model,
        chosen,
        Collator(MedPLIBProcessor(model.config, model.tokenizer)),
        max_new_tokens=4,
        keep_masks=True,
    )
    assert metrics["counts"]["grounding"] == 2 and metrics["counts"]["region"] == 2
    predictions = {p["id"]: p for p in metrics["predictions"]}
    assert len(predictions) == 6 and set(predictions) == {e.id for e in chosen}
    # Each score is that of the prediction it lists against its example's reference, then averaged.
    grounded = [e for e in chosen if e.targets]
    dice = [mask_scores(Mask(**predictions[e.id]["mask"]).to_array(), e.targets[0]).dice for e in grounded]
    assert [predictions[e.id]["dice"] for e in grounded] == pytest.approx(dice)
    assert metrics["mdice"] == pytest.approx(np.mean(dice))
    region = [e for e in chosen if e.task == "region_vqa"]
    recall = [token_scores(predictions[e.id]["prediction"], e.reference).recall for e in region]
    assert metrics["region_recall"] == pytest.approx(np.mean(recall))
    assert set(metrics["mdice_per_structure"]) <= {e.structure for e in chosen}
    assert model.training  # left as it was found


def test_trivial_baselines_answer_without_looking(splits) -> None:
    train, test = splits
    baseline = trivial_baselines(train, test)
    assert 0.0 < baseline["closed_accuracy"] < 0.85  # the most common answer is often right, not mostly
    # The mean training mask of a hemisphere overlaps it; nuclei sit anywhere, so their prior does not.
    assert baseline["mdice_per_structure"]["left hemisphere"] > 0.5
    assert baseline["mdice_per_structure"]["cell nuclei"] < 0.5


def _metrics(accuracy: float, recall: float, dice: float, swap: float = 0.1) -> dict:
    per = {"grey matter": dice, "white matter": dice, "cell nuclei": dice}
    per |= {"left hemisphere": dice, "right hemisphere": dice}
    swaps = {
        "left hemisphere / right hemisphere": {"max_iou": swap},
        "grey matter / white matter": {"max_iou": swap},
    }
    return {
        "closed_accuracy": accuracy,
        "region_recall": recall,
        "mdice": dice,
        "mdice_per_structure": per,
        "swap_iou": swaps,
    }


def test_seed_report_gives_each_seed_its_mean_and_worst() -> None:
    def seed_report(dice: float, swap: float, accuracy: float) -> dict:
        final = _metrics(accuracy, 0.7, dice, swap)
        records = {key: {"metrics": final} for key in ("1", "2", "3", "4", "joint")}
        report = build_report(records, _metrics(0.5, 0.3, 0.2), wall_minutes=9.0, load_average=(1, 2, 3))
        return report | {"setup": {"load_average": (1.0, 2.0, 3.0)}}

    report = build_seed_report({0: seed_report(0.90, 0.05, 0.80), 1: seed_report(0.84, 0.25, 0.76)})
    hemisphere = report["goals"]["mdice_per_structure.left hemisphere"]
    assert hemisphere["per_seed"] == {"0": 0.90, "1": 0.84} and hemisphere["worst"] == 0.84
    assert hemisphere["mean"] == pytest.approx(0.87) and not hemisphere["met"]  # the worst seed misses 0.85
    assert report["goals"]["mdice_per_structure.cell nuclei"]["met"]
    swap = report["goals"]["swap_iou.left hemisphere / right hemisphere"]
    assert swap["worst"] == 0.25 and not swap["met"]  # the worst swap is the largest IoU
    assert report["goals"]["swap_iou.grey matter / white matter"]["met"]  # 0.25 <= 0.3
    assert (
        report["vqa_floors"]["closed_accuracy"]["worst"] == 0.76
        and report["vqa_floors"]["closed_accuracy"]["met"]
    )
    table = format_seed_table(report)
    assert "| Dice left hemisphere | >= 0.85 | 0.900 | 0.840 | 0.870 | 0.840 | **no** |" in table
    assert "swap IoU (largest) left hemisphere / right hemisphere | <= 0.20" in table
    assert "seed 1: training minutes per stage: not recorded; reused: none" in table
    json.dumps(report)


def test_report_checks_goals_and_the_paper_claim() -> None:
    # Stages I and II reused from an earlier run (their seconds are that run's), III, IV and joint trained.
    records = {
        "1": {"title": "I", "metrics": _metrics(0.1, 0.1, 0.0), "seconds": 90.0, "reused": True},
        "2": {"title": "II", "metrics": _metrics(0.90, 0.80, 0.0), "seconds": 180.0, "reused": True},
        "3": {"title": "III", "metrics": _metrics(0.20, 0.20, 0.85), "seconds": 300.0, "reused": False},
        "4": {"title": "IV", "metrics": _metrics(0.89, 0.70, 0.86), "seconds": 150.0, "reused": False},
        "joint": {"title": "joint", "metrics": _metrics(0.87, 0.75, 0.84), "seconds": 600.0},
    }
    report = build_report(records, _metrics(0.5, 0.3, 0.2), wall_minutes=12.3, schedule="tiny")
    assert report["mdice"] == 0.86 and report["wall_minutes"] == 12.3
    assert report["stage_minutes"] == {"1": 1.5, "2": 3.0, "3": 5.0, "4": 2.5, "joint": 10.0}
    assert report["reused_stages"] == ["1", "2"]
    assert "training minutes per stage: 1 1.5, 2 3.0, 3 5.0, 4 2.5, joint 10.0; reused: 1, 2" in format_table(
        report
    )
    assert report["goals"]["closed_accuracy"]["met"] and not report["goals"]["region_recall"]["met"]
    assert set(report["goals"]) == set(GOALS) | set(SWAP_GOAL_NAMES)
    assert [row["stage"] for row in report["comparison"]] == ["2", "3", "joint", "4"]
    keeps = report["moe_keeps_expert_skill"]
    assert keeps["closed_accuracy"]["kept"] and keeps["mdice"]["kept"] and not keeps["region_recall"]["kept"]
    assert report["moe_beats_joint_on"] == ["closed_accuracy", "mdice"]
    assert report["deviations_from_paper"]
    table = format_table(report)
    assert "stage IV MoE" in table and "| 0.890 |" in table and "**no**" in table
    json.dumps(report)  # JSON-ready as it is


def test_plot_draws_a_log_with_routing(tmp_path: Path) -> None:
    routing = {
        "experts": ["a", "b"],
        "layers": {"0": {"all": [0.6, 0.4], "text": [0.7, 0.3], "image": [0.5, 0.5]}},
    }
    lines = [
        {
            "stage": "4",
            "step": s,
            "loss": 2.0 / s,
            "ce": 1.0 / s,
            "lr": 1e-3,
            "samples_per_s": 9.0,
            "routing": routing,
        }
        for s in range(1, 6)
    ]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    png = plot_log(log, tmp_path / "plot.png")
    assert np.asarray(Image.open(png)).shape[2] in (3, 4)
    log.write_text("")
    with pytest.raises(InvalidInputError):
        plot_log(log, tmp_path / "empty.png")


def test_swap_check_by_hand() -> None:
    from medplib.trainers.eval.scoring import swap_check

    left, right = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    left[:, :2], right[:, 1:] = True, True  # overlap 4 px, union 16 px
    masks = {
        ("a.png", "left hemisphere"): left,
        ("a.png", "right hemisphere"): right,
        ("b.png", "left hemisphere"): left,
        ("b.png", "right hemisphere"): left,  # the same mask for both requests
        ("c.png", "grey matter"): np.zeros((4, 4), bool),
        ("c.png", "white matter"): np.zeros((4, 4), bool),  # two empty masks are the same mask
        ("d.png", "grey matter"): left,  # no white-matter request on d: not compared
    }
    check = swap_check(masks)
    hemispheres = check["left hemisphere / right hemisphere"]
    assert hemispheres["images"] == 2 and hemispheres["max_iou"] == 1.0
    assert hemispheres["mean_iou"] == pytest.approx((0.25 + 1.0) / 2) and not hemispheres["met"]
    tissue = check["grey matter / white matter"]
    assert tissue["images"] == 1 and tissue["max_iou"] == 1.0 and tissue["goal_max_iou"] == 0.3
    assert swap_check({("a.png", "left hemisphere"): left, ("a.png", "right hemisphere"): ~left})[
        "left hemisphere / right hemisphere"
    ]["met"]


def test_report_without_the_joint_baseline() -> None:
    records = {key: {"metrics": _metrics(0.8, 0.7, 0.86)} for key in ("1", "2", "3", "4")}
    report = build_report(records, _metrics(0.5, 0.3, 0.2), wall_minutes=5.0, joint=False)
    assert [row["stage"] for row in report["comparison"]] == ["2", "3", "4"]
    assert report["moe_beats_joint_on"] is None
    assert "no joint baseline" in format_table(report)
