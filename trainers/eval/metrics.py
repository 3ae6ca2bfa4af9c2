"""Metrics as MedPLIB reports them: grounding masks (IoU, Dice) and answers (accuracy, recall, F1, BLEU).

Grounding: each predicted mask is thresholded, scored against its reference per image, and the
per-image scores are averaged (mIoU, mDice) overall, per modality and per structure. When both the
prediction and the reference are empty the prediction is perfect (IoU = Dice = 1): the model
rightly found nothing; when exactly one is empty both scores are 0.

Answers are compared after VQA normalisation (`normalize_answer`). Closed questions score exact
match; open questions token precision, recall and F1 (multiset overlap of the normalised words) and
BLEU with nltk exactly as MedPLIB's evaluation script calls it (no smoothing, so short answers score
near 0 on the higher orders), so the numbers compare with the paper's.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from medplib.core.errors import InvalidInputError

# --- grounding -------------------------------------------------------------------------------------


class MaskScore(NamedTuple):
    iou: float
    dice: float


def threshold_mask(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A bool mask: bool stays, integers are non-zero, floats (probabilities) are > `threshold`."""
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if np.issubdtype(array.dtype, np.integer):
        return array != 0
    if np.issubdtype(array.dtype, np.floating):
        return array > threshold
    raise InvalidInputError(f"a mask must be bool, integer or float, got {array.dtype}")


def mask_scores(prediction: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> MaskScore:
    """IoU and Dice of one predicted mask (thresholded) against its reference on the same grid."""
    pred, ref = threshold_mask(prediction, threshold), threshold_mask(reference, threshold)
    if pred.shape != ref.shape:
        raise InvalidInputError(f"prediction {pred.shape} and reference {ref.shape} masks differ in shape")
    intersection = int(np.count_nonzero(pred & ref))
    pred_area, ref_area = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if pred_area + ref_area == 0:
        return MaskScore(1.0, 1.0)  # both empty: the absence was predicted correctly
    union = pred_area + ref_area - intersection
    return MaskScore(intersection / union, 2 * intersection / (pred_area + ref_area))


class ScoredMask(NamedTuple):
    """One image's grounding score and what it is grouped by."""

    score: MaskScore
    modality: str | None = None
    structure: str | None = None


def summarize_masks(rows: Iterable[ScoredMask]) -> dict:
    """{'count', 'mIoU', 'mDice', 'by_modality': {...}, 'by_structure': {...}}; groups hold the same keys.

    Means are over images (MedPLIB's mIoU/mDice), not over pooled pixels.
    """
    rows = list(rows)
    by_modality: dict[str, list[MaskScore]] = defaultdict(list)
    by_structure: dict[str, list[MaskScore]] = defaultdict(list)
    for row in rows:
        if row.modality is not None:
            by_modality[row.modality].append(row.score)
        if row.structure is not None:
            by_structure[row.structure].append(row.score)
    return _mask_means([row.score for row in rows]) | {
        "by_modality": {key: _mask_means(by_modality[key]) for key in sorted(by_modality)},
        "by_structure": {key: _mask_means(by_structure[key]) for key in sorted(by_structure)},
    }


def _mask_means(scores: Sequence[MaskScore]) -> dict:
    """Count and means; no means for no scores (JSON has no NaN)."""
    if not scores:
        return {"count": 0}
    return {
        "count": len(scores),
        "mIoU": _mean(s.iou for s in scores),
        "mDice": _mean(s.dice for s in scores),
    }


# --- answers ---------------------------------------------------------------------------------------

# The standard VQA evaluation's normalisation (Antol et al. 2015; LLaVA-Med and MedPLIB reuse it).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "its": "it's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
}  # fmt: skip
_PUNCTUATION = re.compile(r"""[;/\[\]"{}()=+\\_\-><@`,?!:*#%&|~^$]""")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point


def normalize_answer(text: str) -> str:
    """Lowercase; punctuation to spaces (a decimal point and digit grouping kept as numbers);
    number words to digits ('two' -> '2', and VQA's 'none' -> '0'); articles dropped; the VQA table
    of apostrophe-less contractions restored ('dont' -> "don't"); whitespace collapsed.
    """
    text = _DIGIT_COMMA.sub("", text.lower())
    text = _PERIOD.sub(" ", _PUNCTUATION.sub(" ", text))
    words = (_NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised answers are equal, else 0.0 (closed questions)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


class TokenScores(NamedTuple):
    precision: float
    recall: float
    f1: float


def token_scores(prediction: str, reference: str) -> TokenScores:
    """Precision, recall and F1 of the normalised words, counting each word at most as often as the
    other side has it (so repeating a right word earns nothing). Both empty: 1, 1, 1; one empty: 0s.

    MedPLIB's script counts a shared word as often as the prediction repeats it; the two agree
    whenever no word repeats, as in almost all short answers.
    """
    pred, ref = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(reference).split())
    if not pred and not ref:
        return TokenScores(1.0, 1.0, 1.0)
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return TokenScores(0.0, 0.0, 0.0)
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return TokenScores(precision, recall, 2 * precision * recall / (precision + recall))


# MedPLIB's evaluation (`model/eval/cal_metric.py`) reports nltk's `sentence_bleu` without smoothing:
# "BLEU-1..3" weigh one n-gram order each, and its overall BLEU is the uniform cumulative BLEU-4.
BLEU_WEIGHTS = ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0.25, 0.25, 0.25, 0.25))


def bleu(
    candidate: Sequence[str], references: Sequence[Sequence[str]], weights: Sequence[float] = BLEU_WEIGHTS[-1]
) -> float:
    """nltk's sentence BLEU (Papineni et al. 2002) with MedPLIB's settings: no smoothing, so an order
    without any matching n-gram makes the score (nearly) 0, as in the paper's numbers."""
    import warnings

    from nltk.translate.bleu_score import sentence_bleu

    if not references:
        raise InvalidInputError("BLEU needs at least one reference")
    if not candidate:
        return 0.0
    with warnings.catch_warnings():
        # nltk warns for every answer shorter than its highest order; that is the metric, not a fault.
        warnings.simplefilter("ignore", UserWarning)
        return float(sentence_bleu([list(r) for r in references], list(candidate), weights=tuple(weights)))


def bleu_scores(prediction: str, reference: str) -> tuple[float, float, float, float]:
    """MedPLIB's BLEU-1, -2, -3 (one order each) and cumulative BLEU-4 of two answers after VQA
    normalisation, whitespace-tokenised."""
    candidate, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    b1, b2, b3, b4 = (bleu(candidate, [ref], weights) for weights in BLEU_WEIGHTS)
    return b1, b2, b3, b4


class ScoredAnswer(NamedTuple):
    """One answered question: what the model said, the reference, and 'closed' or 'open'."""

    prediction: str
    reference: str
    answer_type: str


def summarize_answers(rows: Iterable[ScoredAnswer]) -> dict:
    """{'closed': {'count', 'accuracy'}, 'open': {'count', 'recall', 'precision', 'f1', 'bleu1'..'bleu4'}}.

    Each metric is the mean over questions; a part with no question has count 0 and no means.
    """
    closed: list[float] = []
    opened: list[dict[str, float]] = []
    for row in rows:
        kind = row.answer_type.lower()
        if kind not in ("closed", "open"):
            raise InvalidInputError(f"answer type must be 'closed' or 'open', got {row.answer_type!r}")
        if kind == "closed":
            closed.append(exact_match(row.prediction, row.reference))
            continue
        tokens = token_scores(row.prediction, row.reference)
        bleus = bleu_scores(row.prediction, row.reference)
        opened.append(
            {"recall": tokens.recall, "precision": tokens.precision, "f1": tokens.f1}
            | {f"bleu{n}": value for n, value in enumerate(bleus, start=1)}
        )
    summary: dict[str, dict[str, float]] = {"closed": {"count": len(closed)}, "open": {"count": len(opened)}}
    if closed:
        summary["closed"]["accuracy"] = _mean(closed)
    if opened:
        summary["open"] |= {key: _mean(s[key] for s in opened) for key in opened[0]}
    return summary


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values))
