"""The model's losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medplib.core.expert_spec import LossWeights
from medplib.core.model.conversation import IGNORE_INDEX
from medplib.core.model.losses import (
    answer_cross_entropy,
    bce_loss,
    dice_loss,
    focal_loss,
    supervised_positions,
    weighted_loss,
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


def test_the_weighted_loss_sums_samples_and_keeps_each_parts_values() -> None:
    ce = torch.tensor([1.0, 3.0])
    logits = torch.zeros(1, 2, 2)
    target = torch.ones(1, 2, 2)
    weights = LossWeights(ce=1.0, bce=2.0, dice=0.5)
    total, parts = weighted_loss(ce, [None, logits], [None, target], weights)
    bce = math.log(2)
    dice = 1 - (2 * 0.5 * 4 + 1) / (0.5 * 4 + 4 + 1)
    assert total.item() == pytest.approx(1.0 + 3.0 + 2 * bce + 0.5 * dice, rel=1e-6)
    assert set(parts) == {"ce", "bce", "dice"} and parts["ce"].tolist() == [1.0, 3.0]
    assert parts["bce"].tolist() == pytest.approx([bce]) and parts["dice"].tolist() == pytest.approx([dice])
    assert "focal" not in parts  # weight 0: not computed
    # Two halves of a batch add up to the whole batch's loss: accumulation and workers are exact.
    halves = [
        weighted_loss(ce[:1], [None], [None], weights)[0],
        weighted_loss(ce[1:], [logits], [target], weights)[0],
    ]
    assert sum(halves).item() == pytest.approx(total.item(), rel=1e-6)
