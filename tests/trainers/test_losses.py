"""The training losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medplib.core.expert_spec import LossWeights
from medplib.core.model.conversation import IGNORE_INDEX
from medplib.trainers.losses import (
    answer_cross_entropy,
    bce_loss,
    combine_losses,
    dice_loss,
    focal_loss,
    supervised_positions,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bce_is_the_mean_over_pixels() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = (
        -math.log(sigmoid(0.0))
        - math.log(1 - sigmoid(2.0))
        - math.log(1 - sigmoid(-1.0))
        - math.log(sigmoid(3.0))
    ) / 4
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand_and_its_empty_target() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = [sigmoid(0.0), sigmoid(2.0), sigmoid(-1.0), sigmoid(3.0)]
    overlap = p[0] + p[3]
    expected = 1 - (2 * overlap + 1) / (sum(p) + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Confidently predicting nothing where there is nothing costs (almost) nothing.
    assert dice_loss(torch.full((1, 4, 4), -30.0), torch.zeros(1, 4, 4)).item() == pytest.approx(
        0.0, abs=1e-6
    )
    assert dice_loss(torch.full((1, 4, 4), 30.0), torch.ones(1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([[[1.0, -2.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    p1, p2 = sigmoid(1.0), sigmoid(-2.0)
    first = 0.25 * -math.log(p1) * (1 - p1) ** 2
    second = 0.75 * -math.log(1 - p2) * p2**2  # p_t = 1 - p for a negative pixel
    assert focal_loss(logits, target).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_cross_entropy_is_per_sample_mean_over_answer_tokens() -> None:
    labels = torch.tensor([[5, IGNORE_INDEX, 1, 2], [7, IGNORE_INDEX, IGNORE_INDEX, 3]])
    rows, positions, targets = supervised_positions(labels)
    # Position t predicts label t + 1: row 0 predicts 1 and 2 (from positions 1, 2), row 1 predicts 3.
    assert rows.tolist() == [0, 0, 1] and positions.tolist() == [1, 2, 2] and targets.tolist() == [1, 2, 3]
    logits = torch.zeros(3, 4)
    logits[0, 1] = 2.0
    per_sample = answer_cross_entropy(logits, targets, rows, batch=3)
    first = -math.log(math.exp(2) / (math.exp(2) + 3))
    uniform = math.log(4)
    assert per_sample.tolist() == pytest.approx([(first + uniform) / 2, uniform, 0.0])


def test_combined_loss_is_normalised_by_the_global_batch() -> None:
    ce = torch.tensor([1.0, 3.0])
    logits = torch.zeros(1, 2, 2)
    target = torch.ones(1, 2, 2)
    weights = LossWeights(ce=1.0, bce=2.0, dice=0.5)
    loss = combine_losses(ce, [None, logits], [None, target], weights, global_batch=4)
    bce = math.log(2)
    dice = 1 - (2 * 0.5 * 4 + 1) / (0.5 * 4 + 4 + 1)
    assert loss.total.item() == pytest.approx((1.0 + 3.0 + 2 * bce + 0.5 * dice) / 4, rel=1e-6)
    assert loss.parts == pytest.approx({"ce": 2.0, "bce": bce, "dice": dice})
    assert loss.counts == {"ce": 2, "bce": 1, "dice": 1}
    assert "focal" not in loss.parts  # weight 0: not computed
    # Two halves of a batch add up to the whole batch's loss: accumulation and workers are exact.
    halves = [
        combine_losses(ce[:1], [None], [None], weights, global_batch=4).total,
        combine_losses(ce[1:], [logits], [target], weights, global_batch=4).total,
    ]
    assert sum(halves).item() == pytest.approx(loss.total.item(), rel=1e-6)


def test_routing_loss_counts_only_marked_tokens_of_samples_with_an_expert() -> None:
    from medplib.trainers.losses import routing_loss

    # Two samples of three tokens, two experts; one routed layer.
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0], [0.0, 1.0], [9.0, 9.0], [1.0, 0.0]])
    tokens = torch.tensor([[False, True, True], [True, True, False]])
    targets = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # sample 0 belongs to expert 1; sample 1 to none
    per_sample = routing_loss([logits], targets, tokens)
    expected = (math.log(2) + (10 + math.log(1 + math.exp(-10)))) / 2  # tokens 1 and 2 of sample 0
    assert per_sample.tolist() == pytest.approx([expected, 0.0], rel=1e-5)
    # Two identical layers average to the same loss.
    assert routing_loss([logits, logits], targets, tokens).tolist() == pytest.approx(per_sample.tolist())
    # A sample two experts share pulls both gates alike: its loss is the mean of the two experts' CE.
    shared = routing_loss([logits], torch.tensor([[0.5, 0.5], [0.0, 0.0]]), tokens)
    one = routing_loss([logits], torch.tensor([[1.0, 0.0], [0.0, 0.0]]), tokens)
    assert shared[0].item() == pytest.approx((one[0].item() + expected) / 2, rel=1e-5)


def test_pair_contrast_by_hand() -> None:
    """relu(margin + softDice(pred_A, target_B) - softDice(pred_A, target_A)) for each anchor."""
    from medplib.trainers.losses import pair_contrast

    left = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    right = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    # Both requests predict the same mask: probability 0.5 everywhere (logit 0).
    same = torch.zeros(1, 1, 4)
    keys = [("slice", "left hemisphere"), ("slice", "right hemisphere"), None]
    pairs = [("left hemisphere", "right hemisphere")]
    terms = pair_contrast([same, same, None], [left, right, None], keys, pairs, margin=0.3)
    # softDice(p, t) = (2 * 1 + 1) / (2 + 2 + 1) = 0.6 against either target: the term is the margin.
    assert terms.tolist() == pytest.approx([0.3, 0.3])
    # A left mask that is right: softDice own (2*2+1)/(2+2+1) = 1, other (0+1)/(2+2+1) = 0.2.
    sharp = torch.tensor([[[20.0, 20.0, -20.0, -20.0]]])
    terms = pair_contrast([sharp, same], [left, right], keys[:2], pairs, margin=0.3)
    assert terms[0].item() == pytest.approx(0.0, abs=1e-6)  # relu(0.3 + 0.2 - 1)
    assert terms[1].item() == pytest.approx(0.3)  # the right request still gives the blurred mask
    # Other images or other structure pairs are no partners.
    assert (
        len(
            pair_contrast(
                [same, same], [left, right], [("a", "left hemisphere"), ("b", "right hemisphere")], pairs, 0.3
            )
        )
        == 0
    )
    assert (
        len(
            pair_contrast(
                [same, same], [left, right], [("a", "grey matter"), ("a", "white matter")], pairs, 0.3
            )
        )
        == 0
    )


def test_combine_losses_adds_the_weighted_contrast_per_global_batch() -> None:
    ce = torch.tensor([1.0, 2.0])
    plain = combine_losses(ce, [None, None], [None, None], LossWeights(ce=1.0), global_batch=4)
    contrast = torch.tensor([0.3, 0.1])
    both = combine_losses(
        ce, [None, None], [None, None], LossWeights(ce=1.0), 4, contrast=contrast, contrast_weight=3.0
    )
    assert both.total.item() == pytest.approx(plain.total.item() + 3.0 * 0.4 / 4)
    assert both.parts["contrast"] == pytest.approx(0.2) and both.counts["contrast"] == 2
