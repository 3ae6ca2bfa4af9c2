"""`report.md` of `medplib eval`: its metrics against each trivial baseline, as markdown tables.

Tables: the headline metrics (each part's answer metrics, mIoU, mDice), grounding per structure and
per modality, answers per question kind, and the gallery's cases. A baseline that does not answer a
part (the constant masks answer no question) shows "-" there.
"""

from __future__ import annotations

from collections.abc import Sequence

from medplib.trainers.eval.pipeline_report import cell, value
from medplib.trainers.eval.volumes import volume_table

# key in the evaluation's baselines -> its column title in the headline table, in the grounding tables
BASELINES = {
    "training_prior": ("most frequent answer / mean training mask", "mean training mask"),
    "empty_mask": ("empty mask", "empty mask"),
    "whole_image_mask": ("whole-image mask", "whole-image mask"),
}
OPEN_METRICS = (
    ("recall", "recall"),
    ("precision", "precision"),
    ("F1", "f1"),
    *((f"BLEU-{n}", f"bleu{n}") for n in range(1, 5)),
)
Keys = tuple[str, ...]  # a path into an evaluation's nested metrics


def _answer_rows(part: str, label: str) -> list[tuple[str, Keys, Keys]]:
    closed, opened = ("parts", part, "closed"), ("parts", part, "open")
    rows = [(f"{label} closed accuracy", (*closed, "accuracy"), (*closed, "count"))]
    return rows + [(f"{label} open {name}", (*opened, key), (*opened, "count")) for name, key in OPEN_METRICS]


# (label, metric, its sample count)
HEADLINE_ROWS = (
    *_answer_rows("vqa", "VQA"),
    *_answer_rows("region_vqa", "region VQA"),
    ("region recall, all region questions", ("region_recall",), ("counts", "region")),
    ("grounding mIoU", ("parts", "grounding", "mIoU"), ("parts", "grounding", "count")),
    ("grounding mDice", ("parts", "grounding", "mDice"), ("parts", "grounding", "count")),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(item) for item in row) + " |" for row in rows]


def _count(metrics: dict, path: Keys) -> str:
    found = value(metrics, path)
    return "-" if found is None else str(found)


def headline_table(result: dict) -> str:
    """Every headline metric of the model beside each trivial baseline's."""
    metrics, found = result["metrics"], result["baselines"]
    columns = [key for key in BASELINES if key in found]
    rows = [
        [label, _count(metrics, counted), cell(value(metrics, path))]
        + [cell(value(found[key], path)) for key in columns]
        for label, path, counted in HEADLINE_ROWS
        if value(metrics, counted)  # a part the split does not have is left out
    ]
    return "\n".join(_table(["metric", "n", "model", *(BASELINES[key][0] for key in columns)], rows))


def _group_table(result: dict, group: str, title: str) -> list[str]:
    """Grounding per structure or per modality: the model's mIoU and mDice, each baseline's mDice."""
    by_group = result["metrics"]["parts"]["grounding"][group]
    found = result["baselines"]
    columns = [key for key in BASELINES if key in found]
    rows = [
        [name, scores["count"], cell(scores.get("mIoU")), cell(scores.get("mDice"))]
        + [cell(value(found[key], ("parts", "grounding", group, name, "mDice"))) for key in columns]
        for name, scores in by_group.items()
    ]
    header = [title, "n", "mIoU", "mDice", *(f"mDice, {BASELINES[key][1]}" for key in columns)]
    return _table(header, rows)


def _kind_table(result: dict) -> list[str]:
    """Answers per question kind: accuracy of closed questions, recall, F1 and BLEU-1 of open ones."""
    baseline = result["baselines"].get("training_prior")
    rows = []
    for kind, parts in result["metrics"]["by_kind"].items():
        for answer_type, main in (("closed", "accuracy"), ("open", "recall")):
            scores = parts[answer_type]
            if scores["count"]:
                rows.append(
                    [
                        kind,
                        answer_type,
                        scores["count"],
                        cell(scores.get(main)),
                        cell(scores.get("f1")),
                        cell(scores.get("bleu1")),
                        cell(value(baseline, ("by_kind", kind, answer_type, main))),
                    ]
                )
    header = [
        "question kind",
        "type",
        "n",
        "accuracy / recall",
        "F1",
        "BLEU-1",
        "most frequent answer",
    ]
    return _table(header, rows)


def format_report(result: dict) -> str:
    """The whole report.md."""
    setup, counts = result["setup"], result["metrics"]["counts"]
    untrained = ": random weights, what an untrained model scores" if setup["untrained"] else ""
    lines = [
        f"# medplib eval: {setup['model']} on {setup['data']}, {setup['split']} split",
        "",
        f"- model: {setup['model_kind']}{untrained}",
        f"- samples: {setup['samples_scored']} of {setup['samples_in_split']} "
        f"({counts['closed']} closed and {counts['open']} open VQA, {counts['region']} region VQA, "
        f"{counts['grounding']} grounding); {setup['malformed_samples_skipped']} malformed skipped",
        f"- greedy decoding, at most {setup['max_new_tokens']} new tokens; {setup['device']}; "
        f"{setup['seconds']} s",
        "",
        "## Headline metrics against the trivial baselines",
        "",
        headline_table(result),
    ]
    if counts["grounding"]:
        lines += ["", "## Grounding per structure", "", *_group_table(result, "by_structure", "structure")]
        lines += ["", "## Grounding per modality", "", *_group_table(result, "by_modality", "modality")]
    if result["metrics"].get("volumes"):
        lines += ["", "## Volumes", "", *volume_table(result["metrics"]["volumes"])]
    if result["metrics"]["by_kind"]:
        lines += ["", "## Answers per question kind", "", *_kind_table(result)]
    if result["gallery"]:
        rows = [
            [f"{case['group']} {case['rank']}", cell(case["dice"]), case["structure"], case["modality"],
             f"![{case['group']} {case['rank']}]({case['file']})"]
            for case in result["gallery"]
        ]  # fmt: skip
        lines += ["", "## Grounding gallery", ""]
        lines += _table(["case", "Dice", "structure", "modality", "image, reference, prediction"], rows)
    return "\n".join(lines)
