"""`medplib eval`: score a model on one split of a MeCoVQA dataset, as MedPLIB reports it.

The model is a preset (random weights, seeded), a checkpoint folder or fsspec URI written by
`save_pretrained` (a stage IV one with its mixture of experts), or a stage folder of `medplib train` /
`pipeline` (the trunk with its active adapter, or the mixture of experts). A checkpoint whose weights
do not all load is refused with a CheckpointError naming the keys, never scored.

Scoring is `scoring.evaluate`. The trivial baselines are scored on the same samples: the most frequent
training answer with the mean training mask (`scoring.trivial_baselines`, when the dataset has a train
split), the empty mask and the whole-image mask (`scoring.constant_mask_baselines`). OUT receives
`metrics.json` (setup, metrics, baselines, gallery, every prediction), `report.md` and `gallery/`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from medplib.core.devices import resolve_device
from medplib.core.errors import InvalidInputError
from medplib.core.model import MedPLIBProcessor
from medplib.loading import LoadedModel, load_model
from medplib.trainers.collate import Collator, Example, ExampleStore
from medplib.trainers.data.mecovqa import split_files
from medplib.trainers.eval.eval_markdown import format_report
from medplib.trainers.eval.gallery import write_gallery
from medplib.trainers.eval.scoring import MAX_NEW_TOKENS, constant_mask_baselines, evaluate, trivial_baselines
from medplib.trainers.eval.volumes import evaluate_volumes

METRICS_FILE, REPORT_FILE, GALLERY_FOLDER = "metrics.json", "report.md", "gallery"
TRAIN_SPLIT = "train"  # what the trivial baselines learn their answers and mean masks from


def load_for_evaluation(
    location: str, *, device: str = "auto", seed: int = 0, progress: bool | None = None
) -> LoadedModel:
    """The model MODEL names, in eval mode on `device`; every weight of a checkpoint loaded."""
    with _quiet_transformers(progress):
        loaded = load_model(location, seed=seed)
    loaded.model.to(resolve_device(device)).eval()
    return loaded


@contextlib.contextmanager
def _quiet_transformers(progress: bool | None) -> Iterator[None]:
    """transformers' loading bar follows `progress`, and its load report is silenced: a checkpoint
    that does not load whole is refused anyway, with the same keys in the CheckpointError."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if not (progress or (progress is None and sys.stderr.isatty())):
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def split_examples(data: Path, split: str) -> tuple[list[Example], int]:
    """The examples of `split` and how many of its samples were left out as malformed."""
    if data.is_dir():
        splits = sorted(path.stem for path in split_files(data))
        if not splits:
            raise InvalidInputError(
                f"{data} is not a MeCoVQA dataset: it holds no sample files (train.json, test.json, ...)"
            )
        if split not in splits:
            raise InvalidInputError(f"{data} has no split {split!r}; its splits: {', '.join(splits)}")
    store = ExampleStore.open(data, split=split)
    examples, issues = store.examples(), store.loaded.issues
    if not examples:
        first = f" (all {len(issues)} malformed; first: {issues[0].line()})" if issues else ""
        raise InvalidInputError(f"split {split!r} of {data} has no samples to score{first}")
    return examples, len(issues)


def spread_subset(examples: list[Example], limit: int | None) -> list[Example]:
    """`limit` examples spread evenly over the split, so each part keeps its share (None: all)."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise InvalidInputError(f"--limit must be at least 1, got {limit}")
    step = len(examples) / limit
    return [examples[int(index * step)] for index in range(limit)]


def baselines(data: Path, scored: list[Example]) -> dict[str, dict]:
    """Every trivial baseline on the scored examples, by name; those that learn need a train split."""
    found = constant_mask_baselines(scored)
    has_train = data.is_dir() and TRAIN_SPLIT in {path.stem for path in split_files(data)}
    if not has_train:
        return found
    train = ExampleStore.open(data, split=TRAIN_SPLIT).examples()
    return {"training_prior": trivial_baselines(train, scored)} | found


def run_evaluation(
    model: str,
    data: Path,
    out: Path,
    *,
    split: str = "test",
    limit: int | None = None,
    gallery: int = 4,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Score MODEL on DATA's `split` and write metrics.json, report.md and the gallery into `out`.

    `limit` scores that many samples spread over the split; `gallery` is the number of best and of
    worst grounding cases drawn; `max_new_tokens` defaults to the pipeline's `MAX_NEW_TOKENS`.
    """
    max_new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    for name, value, minimum in (
        ("--gallery", gallery, 0),
        ("--batch-size", batch_size, 1),
        ("--max-new-tokens", max_new_tokens, 1),
    ):
        if value < minimum:
            raise InvalidInputError(f"{name} must be at least {minimum}, got {value}")
    began = time.perf_counter()
    examples, malformed = split_examples(data, split)  # bad data fails before the model loads
    scored = spread_subset(examples, limit)
    loaded = load_for_evaluation(model, device=device, seed=seed, progress=progress)
    collator = Collator(MedPLIBProcessor(loaded.model.config, loaded.model.tokenizer))
    metrics = evaluate(
        loaded.model,
        scored,
        collator,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        keep_masks=True,
        progress=progress,
    )
    predictions = metrics.pop("predictions")
    volumes = evaluate_volumes(
        loaded.model,
        data,
        split,
        name=model,
        max_new_tokens=max_new_tokens,
        choose=lambda samples: spread_subset(samples, limit),  # --limit spreads the volumes too
    )
    if volumes is not None:
        metrics["volumes"] = volumes
    result = {
        "setup": {
            "model": model,
            "model_kind": loaded.kind,
            "untrained": loaded.untrained,
            "data": str(data),
            "split": split,
            "samples_in_split": len(examples),
            "samples_scored": len(scored),
            "malformed_samples_skipped": malformed,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "device": str(loaded.model.device),
            "torch": torch.__version__,
        },
        "metrics": metrics,
        "baselines": baselines(data, scored),
    }
    result["gallery"] = write_gallery(out / GALLERY_FOLDER, predictions, scored, gallery)
    result["setup"]["seconds"] = round(time.perf_counter() - began, 1)
    result["predictions"] = predictions
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(result, indent=1))
    (out / REPORT_FILE).write_text(format_report(result) + "\n")
    return result


def default_out(model: str, split: str) -> Path:
    """`eval-<model>-<split>` in the working folder: the preset's or the checkpoint folder's name."""
    name = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return Path(f"eval-{name}-{split}")
