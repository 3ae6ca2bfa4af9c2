"""The pipeline's report: the final model's metrics against the goals, and the paper's claim in miniature.

The comparison has four rows, each scored on the same test split: the stage II expert, the stage
III expert, a single adapter trained jointly on all data with the MoE's budget, and the stage IV
MoE. The MoE keeps an expert's skill when it is within 2 points of accuracy (recall) and 0.02 Dice
of that expert; it beats joint training on a metric when it scores higher there.
"""

from __future__ import annotations

import platform

import torch

from medplib.trainers.stages import TINY_NOTES

HEADLINE = ("closed_accuracy", "region_recall", "mdice", "mdice_per_structure", "open_recall", "miou")
GOALS = {  # metric -> minimum, on the test split
    "mdice": 0.80,
    "mdice_per_structure.grey matter": 0.80,
    "mdice_per_structure.white matter": 0.75,
    "mdice_per_structure.cell nuclei": 0.70,
    "closed_accuracy": 0.85,
    "region_recall": 0.75,
}
ROWS = (
    ("2", "stage II expert (vision-language)"),
    ("3", "stage III expert (pixel grounding)"),
    ("joint", "joint training (one adapter, same budget)"),
    ("4", "stage IV MoE"),
)
SKILLS = {"closed_accuracy": ("2", 0.02), "region_recall": ("2", 0.02), "mdice": ("3", 0.02)}


def metric(metrics: dict, name: str) -> float | None:
    """A metric by dotted name ('mdice_per_structure.grey matter')."""
    return value(metrics, tuple(name.split(".", 1)))


def value(metrics: dict | None, keys: tuple[str, ...]) -> float | int | None:
    """The number under `keys` in nested dicts, or None where a key is absent."""
    found: object = metrics
    for key in keys:
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, float | int) else None


def _headline(metrics: dict) -> dict:
    return {key: metrics.get(key) for key in HEADLINE}


def build_report(records: dict[str, dict], baselines: dict, *, wall_minutes: float, **setup: object) -> dict:
    """report.json: the MoE's headline metrics, goals, the four-row comparison, each stage, baselines."""
    final = records["4"]["metrics"]
    goals = {}
    for name, minimum in GOALS.items():
        value = metric(final, name)
        goals[name] = {
            "goal": minimum,
            "value": value,
            "met": value is not None and value >= minimum,
            "trivial_baseline": metric(baselines, name),
        }
    comparison = [{"row": label, "stage": key, **_headline(records[key]["metrics"])} for key, label in ROWS]
    moe = records["4"]["metrics"]
    keeps = {}
    for name, (expert, tolerance) in SKILLS.items():
        ours, theirs = metric(moe, name), metric(records[expert]["metrics"], name)
        keeps[name] = {
            "expert": expert,
            "expert_value": theirs,
            "moe_value": ours,
            "kept": ours is not None and theirs is not None and ours >= theirs - tolerance,
        }
    joint = records["joint"]["metrics"]
    beats = [name for name in SKILLS if (metric(moe, name) or 0) > (metric(joint, name) or 0)]
    return {
        "wall_minutes": round(wall_minutes, 2),
        **_headline(final),
        "goals": goals,
        "comparison": comparison,
        "moe_keeps_expert_skill": keeps,
        "moe_beats_joint_on": beats,
        "trivial_baselines": _headline(baselines)
        | {"closed_accuracy_per_kind": baselines.get("closed_accuracy_per_kind")},
        "stages": [
            {
                "stage": key,
                "title": record.get("title"),
                "examples": record.get("examples"),
                "steps": record.get("steps"),
                "seconds": record.get("seconds"),
                "final_loss": record.get("final_loss"),
                "metrics": {k: v for k, v in record["metrics"].items() if k != "predictions"},
            }
            for key, record in records.items()
        ],
        "setup": setup
        | {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor()},
        "deviations_from_paper": list(TINY_NOTES) if setup.get("schedule") == "tiny" else [],
    }


def cell(value: float | None) -> str:
    """A metric as a table cell: three decimals, or "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


def format_table(report: dict) -> str:
    """The comparison and the goals as markdown tables."""
    structures = sorted({s for row in report["comparison"] for s in (row.get("mdice_per_structure") or {})})
    header = ["model", "closed acc.", "region recall", "mDice", *(f"Dice {s}" for s in structures)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = {"row": "trivial baseline (no image)", **report["trivial_baselines"]}
    for row in [*report["comparison"], baseline]:
        per = row.get("mdice_per_structure") or {}
        cells = [row["row"], cell(row["closed_accuracy"]), cell(row["region_recall"]), cell(row["mdice"])]
        lines.append("| " + " | ".join(cells + [cell(per.get(s)) for s in structures]) + " |")
    lines += ["", "| goal (stage IV MoE, test split) | minimum | measured | met |", "|---|---|---|---|"]
    for name, goal in report["goals"].items():
        mark = "yes" if goal["met"] else "**no**"
        label = name.replace("mdice_per_structure.", "Dice ")
        lines.append(f"| {label} | {goal['goal']:.2f} | {cell(goal['value'])} | {mark} |")
    lines.append(
        f"\nwall time {report['wall_minutes']:.1f} min; MoE beats joint training on: "
        f"{', '.join(report['moe_beats_joint_on']) or 'nothing'}"
    )
    return "\n".join(lines)
