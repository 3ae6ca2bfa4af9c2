"""The pipeline's report: the final model's metrics against the goals, and the paper's claim in miniature.

The comparison has four rows, each scored on the same test split: the stage II expert, the stage
III expert, a single adapter trained jointly on all data with the MoE's budget, and the stage IV
MoE. The MoE keeps an expert's skill when it is within 2 points of accuracy (recall) and 0.02 Dice
of that expert; it beats joint training on a metric when it scores higher there.
"""

from __future__ import annotations

import platform

import torch

from medplib.trainers.eval.scoring import SWAP_GOALS
from medplib.trainers.stages import TINY_NOTES

HEADLINE = (
    "closed_accuracy",
    "region_recall",
    "mdice",
    "mdice_per_structure",
    "open_recall",
    "miou",
    "swap_iou",
)
GOALS = {  # metric -> minimum, on the test split
    "mdice": 0.80,
    "mdice_per_structure.left hemisphere": 0.85,
    "mdice_per_structure.right hemisphere": 0.85,
    "mdice_per_structure.grey matter": 0.80,
    "mdice_per_structure.white matter": 0.75,
    "mdice_per_structure.cell nuclei": 0.70,
    "closed_accuracy": 0.85,
    "region_recall": 0.75,
}
# Swap check goals: the largest IoU of the two structures' masks on any test image.
SWAP_GOAL_NAMES = {f"swap_iou.{first} / {second}": goal for (first, second), goal in SWAP_GOALS.items()}
# Grounding must not cost VQA: the MoE's scores before the grounding recipe (pipeline.json, 2026-12-05).
VQA_FLOORS = {"closed_accuracy": 0.748, "region_recall": 0.604}
ROWS = (
    ("2", "stage II expert (vision-language)"),
    ("3", "stage III expert (pixel grounding)"),
    ("joint", "joint training (one adapter, same budget)"),
    ("4", "stage IV MoE"),
)
SKILLS = {"closed_accuracy": ("2", 0.02), "region_recall": ("2", 0.02), "mdice": ("3", 0.02)}


def metric(metrics: dict, name: str) -> float | None:
    """A metric by dotted name ('mdice_per_structure.grey matter'); a swap check by its largest IoU."""
    keys = tuple(name.split(".", 1))
    return value(metrics, (*keys, "max_iou") if keys[0] == "swap_iou" else keys)


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
    for name, maximum in SWAP_GOAL_NAMES.items():
        found = metric(final, name)
        goals[name] = {"goal_max": maximum, "value": found, "met": found is not None and found <= maximum}
    comparison = [
        {"row": label, "stage": key, **_headline(records[key]["metrics"])}
        for key, label in ROWS
        if key in records
    ]
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
    beats = None  # no joint baseline trained: nothing to compare with
    if "joint" in records:
        joint = records["joint"]["metrics"]
        beats = [name for name in SKILLS if (metric(moe, name) or 0) > (metric(joint, name) or 0)]
    return {
        "wall_minutes": round(wall_minutes, 2),  # this pass's, which may have reused finished stages
        # Each stage's training time as it ran (a reused stage's from its own run), and the reused ones.
        "stage_minutes": {key: round(r["seconds"] / 60, 2) for key, r in records.items() if "seconds" in r},
        "reused_stages": [key for key, record in records.items() if record.get("reused")],
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
    lines += ["", "| goal (stage IV MoE, test split) | goal | measured | met |", "|---|---|---|---|"]
    for name, goal in report["goals"].items():
        mark = "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal_label(name)} | {goal_bound(goal)} | {cell(goal['value'])} | {mark} |")
    beats = report["moe_beats_joint_on"]
    versus = (
        "no joint baseline"
        if beats is None
        else f"MoE beats joint training on: {', '.join(beats) or 'nothing'}"
    )
    lines.append(f"\nwall time {report['wall_minutes']:.1f} min; {versus}")
    lines.append(stage_time_line(report))
    return "\n".join(lines)


def stage_time_line(report: dict) -> str:
    """Each stage's training minutes as it ran, and which stages this pass reused rather than trained:
    a pass that reuses finished stages takes a fraction of the pipeline's wall time."""
    minutes = ", ".join(f"{key} {value:.1f}" for key, value in report.get("stage_minutes", {}).items())
    reused = report.get("reused_stages") or []
    return f"training minutes per stage: {minutes or 'not recorded'}; reused: {', '.join(reused) or 'none'}"


def goal_label(name: str) -> str:
    label = name.replace("mdice_per_structure.", "Dice ")
    return label.replace("swap_iou.", "swap IoU (largest) ")


def goal_bound(goal: dict) -> str:
    return f"<= {goal['goal_max']:.2f}" if "goal_max" in goal else f">= {goal['goal']:.2f}"


def build_seed_report(reports: dict[int, dict]) -> dict:
    """One pipeline per seed -> every goal per seed, its mean and its worst seed; met when the worst
    seed meets it (a recipe that works on one seed in two is not a recipe)."""
    seeds = sorted(reports)
    goals = {}
    first = reports[seeds[0]]["goals"]
    for name in first:
        values = [reports[seed]["goals"][name]["value"] for seed in seeds]
        bound = {k: v for k, v in first[name].items() if k in ("goal", "goal_max")}
        known = [v for v in values if v is not None]
        worst = None
        if len(known) == len(values):
            worst = max(known) if "goal_max" in bound else min(known)
        met = worst is not None and (
            worst <= bound["goal_max"] if "goal_max" in bound else worst >= bound["goal"]
        )
        goals[name] = bound | {
            "per_seed": dict(zip(map(str, seeds), values, strict=True)),
            "mean": sum(known) / len(known) if known else None,
            "worst": worst,
            "met": met,
        }
    floors = {}
    for name, floor in VQA_FLOORS.items():
        values = [metric(reports[seed], name) for seed in seeds]
        known = [v for v in values if v is not None]
        worst = min(known) if len(known) == len(values) else None
        floors[name] = {
            "floor": floor,
            "per_seed": dict(zip(map(str, seeds), values, strict=True)),
            "mean": sum(known) / len(known) if known else None,
            "worst": worst,
            "met": worst is not None and worst >= floor,
        }
    walls = [reports[seed]["wall_minutes"] for seed in seeds]
    return {
        "seeds": seeds,
        "goals": goals,
        "vqa_floors": floors,
        "wall_minutes": dict(zip(map(str, seeds), walls, strict=True)),
        "load_average": {str(seed): reports[seed]["setup"].get("load_average") for seed in seeds},
        "per_seed": {str(seed): reports[seed] for seed in seeds},
    }


def format_seed_table(report: dict) -> str:
    """Each goal on every seed, with the mean and the worst seed, as a markdown table."""
    seeds = report["seeds"]
    header = [
        "goal (stage IV MoE, test split)",
        "goal",
        *(f"seed {s}" for s in seeds),
        "mean",
        "worst",
        "met",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(goal_label(name), goal_bound(goal), goal) for name, goal in report["goals"].items()]
    rows += [
        (f"{name} (no lower than before)", f">= {f['floor']:.3f}", f)
        for name, f in report["vqa_floors"].items()
    ]
    for label, bound, goal in rows:
        cells = [cell(goal["per_seed"][str(s)]) for s in seeds]
        cells += [cell(goal["mean"]), cell(goal["worst"]), "yes" if goal["met"] else "**no**"]
        lines.append(f"| {label} | {bound} | {' | '.join(cells)} |")
    walls = ", ".join(f"seed {s} {report['wall_minutes'][str(s)]:.1f} min" for s in seeds)
    lines.append(f"\nwall time per seed: {walls}")
    lines += [f"seed {s}: {stage_time_line(report['per_seed'][str(s)])}" for s in seeds]
    return "\n".join(lines)
