"""What a MeCoVQA dataset holds: samples per part, modality, question kind and answer, per split.

Works on any dataset in the format: a sample without medplib's keys counts under the file it is in
(its split), the part its tags imply and modality 'unknown'.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from medplib.core.errors import MedplibError
from medplib.trainers.data.mecovqa import PART_NAMES, Sample, read_json_list, sample_files

SPLIT_ORDER = ("train", "val", "test")


def dataset_stats(source: Path, top_answers: int = 20) -> dict:
    """Counts for a dataset folder or one JSON file; samples that do not parse count as 'unparsed'."""
    by_split: dict[str, list[Sample]] = {}
    unparsed = 0
    for path in sample_files(source):
        samples = by_split.setdefault(path.stem, [])
        for raw in read_json_list(path):
            try:
                samples.append(Sample.model_validate(raw))
            except (ValueError, MedplibError):  # pydantic's ValidationError is a ValueError
                unparsed += 1
    return sample_stats(by_split, top_answers) | {"unparsed": unparsed}


def sample_stats(by_split: dict[str, list[Sample]], top_answers: int = 20) -> dict:
    """{'samples', 'images', 'masks', 'splits', 'part', 'modality', 'question_kind', 'answer_type',
    'answers'}: each table maps a value to its count per split; 'answers' keeps the closed answers'
    `top_answers` most common."""
    splits = sorted(
        by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)
    )
    samples = [(split, sample) for split in splits for sample in by_split[split]]

    def table(key: Callable[[Sample], str | None], keep: int | None = None) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for split, sample in samples:
            value = key(sample)
            if value is not None:
                counts[value][split] += 1
        order = sorted(counts, key=lambda v: (-sum(counts[v].values()), v))[:keep]
        return {value: {split: counts[value][split] for split in splits} for value in order}

    def answer_type(sample: Sample) -> str:
        return "mask" if sample.inferred_part == "G" else (sample.answer_type or "unknown").lower()

    return {
        "samples": len(samples),
        "images": len({s.image for _, s in samples if s.image}),
        "masks": len({p for _, s in samples for p in s.region_paths + s.mask_paths}),
        "splits": splits,
        "part": table(lambda s: s.inferred_part),
        "modality": table(lambda s: s.modality or "unknown"),
        "question_kind": table(lambda s: s.question_kind),
        "answer_type": table(answer_type),
        "answers": table(
            lambda s: s.conversations[1].value if answer_type(s) == "closed" else None, top_answers
        ),
    }


def format_stats(stats: dict) -> str:
    """The tables of `sample_stats` as aligned text, one per heading."""
    splits = stats["splits"]
    lines = [f"samples {stats['samples']}  images {stats['images']}  masks {stats['masks']}"]
    if stats.get("unparsed"):
        lines[0] += f"  unparsed {stats['unparsed']}"
    headings = {
        "part": "part",
        "modality": "modality",
        "question_kind": "question kind",
        "answer_type": "answer type",
        "answers": "closed answers",
    }
    for key, heading in headings.items():
        rows = stats[key]
        if not rows:
            continue
        names = {v: f"{v} {PART_NAMES[v]}" if key == "part" else v for v in rows}
        lines += ["", *_table(heading, splits, [(names[v], rows[v]) for v in rows], total=key == "part")]
    return "\n".join(lines)


def _table(
    heading: str, splits: list[str], rows: Iterable[tuple[str, dict[str, int]]], total: bool
) -> list[str]:
    rows = list(rows)
    if total:
        rows.append(("total", {s: sum(r[s] for _, r in rows) for s in splits}))
    width = max(len(heading), *(len(name) for name, _ in rows))
    columns = [*splits, "total"]
    cell = max(5, *(len(c) for c in columns))
    lines = [f"{heading:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in columns)]
    for name, counts in rows:
        values = [counts[s] for s in splits] + [sum(counts.values())]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{cell}}" for v in values))
    return lines
