"""Metrics against cases computed by hand: mask IoU/Dice, VQA normalisation, token F1, BLEU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medplib.core.errors import InvalidInputError
from medplib.trainers.eval.metrics import (
    MaskScore,
    ScoredAnswer,
    ScoredMask,
    bleu,
    bleu_scores,
    exact_match,
    mask_scores,
    normalize_answer,
    summarize_answers,
    summarize_masks,
    token_scores,
)


def grid(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_iou_and_dice_of_small_masks() -> None:
    pred = grid(["##..", "##..", "...."])  # 4 pixels
    ref = grid([".##.", ".##.", ".##."])  # 6 pixels, 2 shared
    score = mask_scores(pred, ref)
    assert score.iou == pytest.approx(2 / 8)  # union 4 + 6 - 2
    assert score.dice == pytest.approx(2 * 2 / 10)


def test_probabilities_are_thresholded_at_one_half() -> None:
    pred = np.array([[0.9, 0.5], [0.51, 0.1]])  # > 0.5: two pixels
    ref = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    assert mask_scores(pred, ref) == MaskScore(iou=0.5, dice=pytest.approx(2 / 3))
    assert mask_scores(pred, ref, threshold=0.95) == MaskScore(0.0, 0.0)


def test_empty_cases_are_defined() -> None:
    empty, full = np.zeros((3, 3), bool), np.ones((3, 3), bool)
    assert mask_scores(empty, empty) == MaskScore(1.0, 1.0)  # rightly predicted absent
    assert mask_scores(empty, full) == MaskScore(0.0, 0.0)
    assert mask_scores(full, empty) == MaskScore(0.0, 0.0)


def test_masks_must_share_a_grid() -> None:
    with pytest.raises(InvalidInputError, match="differ in shape"):
        mask_scores(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_means_are_over_images_per_modality_and_structure() -> None:
    rows = [
        ScoredMask(MaskScore(1.0, 1.0), "MRI", "grey matter"),
        ScoredMask(MaskScore(0.5, 2 / 3), "MRI", "white matter"),
        ScoredMask(MaskScore(0.0, 0.0), "microscopy", "grey matter"),
    ]
    summary = summarize_masks(rows)
    assert summary["count"] == 3
    assert summary["mIoU"] == pytest.approx(0.5)
    assert summary["mDice"] == pytest.approx((1 + 2 / 3) / 3)
    assert summary["by_modality"]["MRI"] == {"count": 2, "mIoU": 0.75, "mDice": pytest.approx(5 / 6)}
    assert summary["by_structure"]["grey matter"] == {"count": 2, "mIoU": 0.5, "mDice": 0.5}
    assert summarize_masks([]) == {"count": 0, "by_modality": {}, "by_structure": {}}


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Yes.", "yes"),
        ("The grey matter", "grey matter"),
        ("An X-ray", "x ray"),
        ("Two nodules, 3.5 mm wide!", "2 nodules 3.5 mm wide"),
        ("1,000 cells", "1000 cells"),
        ("It doesnt   show ANY lesion?", "it doesn't show any lesion"),
        ("left/right", "left right"),
        ("none", "0"),
    ],
)
def test_vqa_normalisation(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match_compares_normalised_answers() -> None:
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("the axial plane", "Axial plane") == 1.0
    assert exact_match("yes, it does", "yes") == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("grey matter", "the grey matter", (1.0, 1.0, 1.0)),
        ("white matter", "grey matter", (0.5, 0.5, 0.5)),
        ("a liver lesion in the abdomen", "liver lesion", (0.5, 1.0, 2 / 3)),  # 2 of 4 predicted words
        ("yes yes", "yes", (0.5, 1.0, 2 / 3)),  # a repeated word counts once: the reference has it once
        ("no", "yes", (0.0, 0.0, 0.0)),
        ("", "yes", (0.0, 0.0, 0.0)),
        ("the", "a", (1.0, 1.0, 1.0)),  # both empty after normalisation
    ],
)
def test_token_precision_recall_f1(
    prediction: str, reference: str, expected: tuple[float, float, float]
) -> None:
    assert tuple(token_scores(prediction, reference)) == pytest.approx(expected)


def test_bleu_textbook_example() -> None:
    """nltk's documented example: three references, BLEU-4 = 0.5046.

    Clipped n-gram matches over candidate n-grams: 17/18, 10/17, 7/16, 4/15; the candidate has 18
    words and so does the closest reference, so the brevity penalty is 1.
    """
    hypothesis = (
        "It is a guide to action which ensures that the military always obeys the commands of the party"
    )
    references = [
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of"
        " the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    ]
    score = bleu(hypothesis.split(), [r.split() for r in references])
    assert score == pytest.approx((17 / 18 * 10 / 17 * 7 / 16 * 4 / 15) ** 0.25)
    assert score == pytest.approx(0.5045666840058485)
    # One order at a time, as MedPLIB's BLEU-2 and BLEU-3.
    assert bleu(hypothesis.split(), [r.split() for r in references], (0, 1, 0, 0)) == pytest.approx(10 / 17)


def test_bleu_clips_repeated_words_and_penalises_brevity() -> None:
    reference = [["the", "cat", "is", "on", "the", "mat"]]
    # Papineni et al.'s example: 'the' appears at most twice in the reference, so 2 of 7 words count.
    assert bleu(["the"] * 7, reference, (1, 0, 0, 0)) == pytest.approx(2 / 7)
    # 3 of 3 words match, but the reference has 6: brevity penalty exp(1 - 6/3).
    assert bleu(["the", "cat", "is"], reference, (1, 0, 0, 0)) == pytest.approx(math.exp(-1))


def test_bleu_is_unsmoothed_as_in_medplib() -> None:
    # No smoothing: a one-word answer has no 2-, 3- or 4-gram, so even a perfect one scores ~0 on BLEU-4.
    assert bleu(["yes"], [["yes"]], (1, 0, 0, 0)) == 1.0
    assert bleu(["yes"], [["yes"]]) < 1e-100
    # 'grey matter' vs 'white matter': unigrams 1/2, no bigram matches.
    assert bleu(["grey", "matter"], [["white", "matter"]], (1, 0, 0, 0)) == pytest.approx(0.5)
    assert bleu(["grey", "matter"], [["white", "matter"]], (0, 1, 0, 0)) < 1e-100
    assert bleu([], [["yes"]]) == 0.0
    with pytest.raises(InvalidInputError):
        bleu(["yes"], [])


def test_bleu_scores_normalise_first() -> None:
    b1, b2, b3, b4 = bleu_scores("The grey matter is bright.", "grey matter is bright")
    assert (b1, b2, b3, b4) == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_summarize_answers_by_answer_type() -> None:
    summary = summarize_answers(
        [
            ScoredAnswer("Yes", "yes", "closed"),
            ScoredAnswer("axial", "coronal", "closed"),
            ScoredAnswer("white matter", "grey matter", "open"),
            ScoredAnswer("grey matter", "grey matter", "open"),
        ]
    )
    assert summary["closed"] == {"count": 2, "accuracy": 0.5}
    assert summary["open"]["count"] == 2
    assert summary["open"]["recall"] == pytest.approx(0.75)
    assert summary["open"]["f1"] == pytest.approx(0.75)
    assert summary["open"]["bleu1"] == pytest.approx(0.75)
    assert summarize_answers([]) == {"closed": {"count": 0}, "open": {"count": 0}}
    with pytest.raises(InvalidInputError, match="answer type"):
        summarize_answers([ScoredAnswer("a", "b", "maybe")])
