"""Scoring a model on a split: it answers every question by generation, and is scored as MedPLIB is.

The model sees each sample's question without its answer and generates (greedy, KV cache). Closed
questions score exact match, open ones token recall / F1 / BLEU (`trainers.eval.metrics`). A grounding answer
is scored by the mask of the first `<SEG>` the model itself generates; an answer without one scores
as an empty mask (Dice 0 against any structure), which is what a user of that model would get.

The headline numbers (`closed_accuracy`, `region_recall`, `mdice`, `mdice_per_structure`) are

- `closed_accuracy`: exact match over the complex-VQA (C) closed questions;
- `region_recall`: token recall over every region (R) question, open (what is marked) and closed
  (which hemisphere);
- `mdice`: mean per-image Dice over all grounding (G) samples, also per structure and modality;
- `swap_iou`: per structure pair (left / right hemisphere, grey / white matter), the IoU of the two
  masks the model predicts on each test image that asks for both (`swap_check`).

`parts` holds every metric of each part (closed accuracy; open recall, precision, F1, BLEU-1..4;
mIoU and mDice overall, per modality and per structure) and `by_kind` the answer metrics per
question kind.

`trivial_baselines` gives what a model that ignores the image gets: the training split's most
common answer per question kind, and per structure the mean training mask; `constant_mask_baselines`
what the empty mask and the whole-image mask get.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from medplib.core.masks import Mask
from medplib.core.model import MedPLIBForCausalLM
from medplib.trainers.collate import Collator, Example
from medplib.trainers.eval.metrics import (
    ScoredMask,
    exact_match,
    mask_scores,
    summarize_answers,
    summarize_masks,
    token_scores,
)

MAX_NEW_TOKENS = 32
# The request-swap check: two requests about one image must give different masks. Per structure
# pair, the largest IoU allowed between the two predicted masks on any test image that asks both.
SWAP_GOALS = {("left hemisphere", "right hemisphere"): 0.2, ("grey matter", "white matter"): 0.3}


def swap_check(masks: dict[tuple[str, str], np.ndarray]) -> dict[str, dict]:
    """IoU of the masks predicted for the two structures of each `SWAP_GOALS` pair, per image that
    has a request for both; `masks` maps (image, structure) to the predicted mask. Two empty masks
    count as the same mask (IoU 1)."""
    report = {}
    for (first, second), goal in SWAP_GOALS.items():
        ious = []
        for (image, structure), mask in sorted(masks.items()):
            other = masks.get((image, second))
            if structure != first or other is None:
                continue
            union = np.logical_or(mask, other).sum()
            ious.append(float(np.logical_and(mask, other).sum() / union) if union else 1.0)
        report[f"{first} / {second}"] = {
            "images": len(ious),
            "mean_iou": _mean(ious),
            "max_iou": max(ious) if ious else None,
            "goal_max_iou": goal,
            "met": bool(ious) and max(ious) <= goal,
        }
    return report


def _headline(answers: dict[str, list[Answered]], masks: list[ScoredMask]) -> dict:
    """The report's metrics from scored answers (by part) and scored masks."""
    complex_vqa = summarize_answers(answers["vqa"])
    region = answers["region_vqa"]
    grounding = summarize_masks(masks)
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_wording: dict[str, list[float]] = defaultdict(list)
    for row in answers["vqa"]:
        if row.answer_type == "closed":
            by_kind[row.kind].append(exact_match(row.prediction, row.reference))
            by_wording["held_out" if row.held_out else "seen"].append(by_kind[row.kind][-1])
    by_question_kind: dict[str, list[Answered]] = defaultdict(list)
    for row in (*answers["vqa"], *region):
        by_question_kind[row.kind].append(row)
    region_by_wording: dict[str, list[float]] = defaultdict(list)
    for row in region:
        region_by_wording["held_out" if row.held_out else "seen"].append(
            token_scores(row.prediction, row.reference).recall
        )
    return {
        "closed_accuracy": complex_vqa["closed"].get("accuracy"),
        "closed_accuracy_per_kind": {kind: float(np.mean(v)) for kind, v in sorted(by_kind.items())},
        # Wordings the training split never uses are about a third of the test questions.
        "closed_accuracy_by_wording": {key: _mean(v) for key, v in sorted(by_wording.items())},
        "region_recall_by_wording": {key: _mean(v) for key, v in sorted(region_by_wording.items())},
        "open_recall": complex_vqa["open"].get("recall"),
        "open_f1": complex_vqa["open"].get("f1"),
        "region_recall": _mean([token_scores(r.prediction, r.reference).recall for r in region]),
        "region_closed_accuracy": summarize_answers(region)["closed"].get("accuracy"),
        "mdice": grounding.get("mDice"),
        "miou": grounding.get("mIoU"),
        "mdice_per_structure": {k: v.get("mDice") for k, v in grounding["by_structure"].items()},
        "mdice_per_modality": {k: v.get("mDice") for k, v in grounding["by_modality"].items()},
        "counts": {
            "closed": complex_vqa["closed"]["count"],
            "open": complex_vqa["open"]["count"],
            "region": len(region),
            "grounding": grounding["count"],
        },
        "parts": {"vqa": complex_vqa, "region_vqa": summarize_answers(region), "grounding": grounding},
        "by_kind": {kind: summarize_answers(rows) for kind, rows in sorted(by_question_kind.items())},
    }


class Answered(NamedTuple):
    """A `ScoredAnswer` (the metrics read it as one) that also knows its question kind."""

    prediction: str
    reference: str
    answer_type: str
    kind: str
    held_out: bool  # asked in a wording kept for the test split


def _scored(example: Example, prediction: str) -> Answered:
    kind = example.kind or "other"
    return Answered(
        prediction, example.reference, example.answer_type or "open", kind, example.held_out_wording
    )


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@torch.no_grad()
def evaluate(
    model: MedPLIBForCausalLM,
    examples: Sequence[Example],
    collator: Collator,
    *,
    batch_size: int = 32,
    max_new_tokens: int = MAX_NEW_TOKENS,
    keep_masks: bool = False,
    progress: bool | None = False,
) -> dict:
    """Generate an answer to every example and score them; also returns each prediction.

    `keep_masks` adds each predicted grounding mask to its prediction (COCO RLE, as `Mask` dumps it).
    `progress` shows a bar on stderr (None: only on a terminal, as tqdm decides).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: dict[str, list] = {"vqa": [], "region_vqa": []}
    masks: list[ScoredMask] = []
    made_masks: dict[tuple[str, str], np.ndarray] = {}  # (image, structure) -> mask, for the swap check
    predictions = []
    bar = tqdm(
        total=len(examples),
        disable=None if progress is None else not progress,
        desc="evaluate",
        unit="sample",
        dynamic_ncols=True,
    )
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collator(chunk, train=False)
        generated = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device),
            region_masks=[m.to(device) for m in batch["region_masks"]],
            max_new_tokens=max_new_tokens,
        )
        texts = collator.processor.decode(generated.sequences)
        predicted_masks = None
        if any(example.targets for example in chunk):
            predicted_masks = model.predict_masks(
                generated.seg_hidden_states,
                batch["sam_pixel_values"].to(device),
                batch["sam_input_sizes"],
                batch["original_sizes"],
            )
        for i, (example, text) in enumerate(zip(chunk, texts, strict=True)):
            entry = {
                "id": example.id,
                "task": example.task,
                "prediction": text,
                "reference": example.reference,
            }
            if example.targets:
                target = example.targets[0]
                made = predicted_masks[i].masks
                mask = made[0].cpu().numpy() if len(made) else np.zeros_like(target)
                score = mask_scores(mask, target)
                masks.append(ScoredMask(score, example.modality, example.structure))
                made_masks[(example.image, example.structure or "")] = mask
                entry["dice"] = score.dice
                if keep_masks:
                    entry["mask"] = Mask.from_array(mask).model_dump()
            elif example.task in answers:
                answers[example.task].append(_scored(example, text))
            predictions.append(entry)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return _headline(answers, masks) | {"swap_iou": swap_check(made_masks), "predictions": predictions}


def trivial_baselines(train: Sequence[Example], test: Sequence[Example]) -> dict:
    """Scores of answering without looking: the most common training answer of each question kind,
    and per structure the mean training mask (per image size where one exists) thresholded at 0.5."""
    common: dict[str, Counter] = defaultdict(Counter)
    priors: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for example in train:
        if example.targets:
            mask = example.targets[0].astype(np.float32)
            priors[(example.structure, mask.shape)].append(mask)
            priors[(example.structure, None)].append(_resized(mask, (64, 64)))
        else:
            common[example.kind].update([example.reference])
    answers: dict[str, list] = {"vqa": [], "region_vqa": []}
    masks = []
    for example in test:
        if example.targets:
            target = example.targets[0]
            same_size = priors.get((example.structure, target.shape))
            if same_size:
                prior = np.mean(same_size, axis=0)
            else:
                prior = _resized(
                    np.mean(priors.get((example.structure, None), [np.zeros((64, 64))]), axis=0), target.shape
                )
            masks.append(ScoredMask(mask_scores(prior > 0.5, target), example.modality, example.structure))
        elif example.task in answers:
            guess = common[example.kind].most_common(1)[0][0] if common[example.kind] else ""
            answers[example.task].append(_scored(example, guess))
    return _headline(answers, masks)


def constant_mask_baselines(test: Sequence[Example]) -> dict[str, dict]:
    """Grounding scores of two answers that need no model: the empty mask and the whole-image mask."""

    def scored(fill: bool) -> list[ScoredMask]:
        return [
            ScoredMask(mask_scores(np.full(e.targets[0].shape, fill), e.targets[0]), e.modality, e.structure)
            for e in test
            if e.targets
        ]

    no_answers: dict[str, list] = {"vqa": [], "region_vqa": []}
    return {
        "empty_mask": _headline(no_answers, scored(False)),
        "whole_image_mask": _headline(no_answers, scored(True)),
    }


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
