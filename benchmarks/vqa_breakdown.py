"""Where a model's VQA answers go wrong: closed accuracy and region recall by kind, modality and wording.

    python benchmarks/vqa_breakdown.py --data DATA --split test NAME=FOLDER_OR_FILE ...

Each FOLDER_OR_FILE is a scored stage folder (its `eval.json`, test split, as `medplib train
--evaluate` and `medplib pipeline` write it) or a `metrics.json` of `medplib eval` (any split). Reads
the predictions there, joins them with the split's samples by id and prints per run:

- closed accuracy per question kind, per modality, seen vs held-out wording;
- how often a closed answer is the training split's most common answer for its kind ("majority"),
  and how often it is no answer the training split ever gives for that kind ("off-kind");
- region recall per kind; open recall.

Writes the rows to `benchmarks/results/vqa_breakdown.json` (or `--out`) and the table beside it as
`.md`. No model runs here.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from medplib.trainers.collate import ExampleStore
from medplib.trainers.eval.metrics import exact_match, normalize_answer, token_scores

RESULTS = Path(__file__).parent / "results"


def predictions(source: Path) -> list[dict]:
    file = source / "eval.json" if source.is_dir() else source
    if not file.is_file():
        raise SystemExit(f"error: {source} has no eval.json (score it with medplib train --evaluate)")
    return json.loads(file.read_text())["predictions"]


def kind_answers(data: Path) -> dict[str, Counter]:
    """Per closed question kind, how often the training split gives each normalised answer."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for example in ExampleStore.open(data, split="train").examples():
        if example.task in ("vqa", "region_vqa") and example.answer_type == "closed":
            answers[example.kind or "other"][normalize_answer(example.reference)] += 1
    return answers


def breakdown(rows: list[dict], examples: dict, train_answers: dict[str, Counter]) -> dict:
    closed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    region: dict[str, list[float]] = defaultdict(list)
    open_recall: list[float] = []
    majority, off_kind = [], []
    for row in rows:
        example = examples[row["id"]]
        if example.task not in ("vqa", "region_vqa"):
            continue
        prediction, reference = row["prediction"], example.reference
        if example.task == "region_vqa":
            region[example.kind or "other"].append(token_scores(prediction, reference).recall)
            region["all"].append(region[example.kind or "other"][-1])
            continue
        if example.answer_type != "closed":
            open_recall.append(token_scores(prediction, reference).recall)
            continue
        right = exact_match(prediction, reference)
        kind = example.kind or "other"
        for axis, key in (
            ("all", "all"),
            ("kind", kind),
            ("modality", example.modality or "none"),
            ("wording", "held_out" if example.held_out_wording else "seen"),
        ):
            closed[axis][key].append(right)
        seen = train_answers.get(kind, Counter())
        said = normalize_answer(prediction)
        majority.append(float(bool(seen) and said == seen.most_common(1)[0][0]))
        off_kind.append(float(said not in seen))
    summary = {
        axis: {key: {"accuracy": float(np.mean(v)), "count": len(v)} for key, v in sorted(by.items())}
        for axis, by in closed.items()
    }
    return {
        "closed": summary,
        "closed_majority_answer_share": float(np.mean(majority)) if majority else None,
        "closed_off_kind_share": float(np.mean(off_kind)) if off_kind else None,
        "region_recall": {
            k: {"recall": float(np.mean(v)), "count": len(v)} for k, v in sorted(region.items())
        },
        "open_recall": float(np.mean(open_recall)) if open_recall else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=RESULTS / "vqa_breakdown.json")
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER_OR_FILE")
    args = parser.parse_args()
    examples = {e.id: e for e in ExampleStore.open(args.data, split=args.split).examples()}
    train_answers = kind_answers(args.data)
    result = {"split": args.split, "runs": {}}
    for run in args.runs:
        name, _, source = run.partition("=")
        result["runs"][name] = breakdown(predictions(Path(source)), examples, train_answers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"# VQA by kind ({args.split} split)\n\n{table(result)}\n")
    print(table(result))


def table(result: dict) -> str:
    """One markdown table: a column per run, a row per closed kind / modality / wording and region kind."""
    runs = result["runs"]
    keys: list[tuple[str, str]] = []
    for run in runs.values():
        for axis, by in run["closed"].items():
            keys += [(axis, key) for key in by if (axis, key) not in keys]
        keys += [("region", key) for key in run["region_recall"] if ("region", key) not in keys]
    lines = ["| " + " | ".join(["row", *runs]) + " |", "|" + "---|" * (len(runs) + 1)]
    for axis, key in keys:
        cells = []
        for run in runs.values():
            entry = (run["region_recall"] if axis == "region" else run["closed"].get(axis, {})).get(key)
            if entry is None:
                cells.append("")
                continue
            value = entry["recall"] if axis == "region" else entry["accuracy"]
            cells.append(f"{value:.3f} ({entry['count']})")
        lines.append(f"| {axis}: {key} | " + " | ".join(cells) + " |")
    for label, field in (
        ("closed: majority answer", "closed_majority_answer_share"),
        ("closed: off-kind answer", "closed_off_kind_share"),
        ("open recall", "open_recall"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{run[field]:.3f}" for run in runs.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
