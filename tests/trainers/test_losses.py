"""The stage's additions to the model's loss against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medplib.trainers.losses import combine_losses, decision_tokens, pair_contrast, routing_loss


def test_routing_loss_counts_only_marked_tokens_of_samples_with_an_expert() -> None:
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


def test_routing_loss_weighs_the_decision_token_and_balances_experts() -> None:
    # Three samples of three tokens, one layer; samples 0 and 1 belong to expert 0, sample 2 to 1.
    logits = torch.tensor([[0.0, 0.0]] * 9)
    logits[1] = torch.tensor([0.0, 4.0])  # sample 0's second token leans to the wrong expert
    tokens = torch.ones(3, 3, dtype=torch.bool)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    plain = routing_loss([logits], targets, tokens)
    labels = torch.tensor([[-100, -100, 7], [-100, 5, 6], [-100, -100, -100]])  # sample 2: no answer
    assert decision_tokens(labels).tolist() == [1, 0, 0]
    decision = torch.tensor([1, 0, 2])
    weighted = routing_loss([logits], targets, tokens, decision, decision_weight=2.0)
    wrong = 4 + math.log(1 + math.exp(-4))  # CE of sample 0's decision token
    assert weighted.tolist() == pytest.approx(
        [plain[0].item() + 2 * wrong, plain[1].item() + 2 * math.log(2), plain[2].item() + 2 * math.log(2)]
    )
    # Balanced: expert 1's one sample counts as much as expert 0's two (3 / (2 * n_e) each).
    balanced = routing_loss([logits], targets, tokens, balanced=True)
    assert balanced.tolist() == pytest.approx(
        [0.75 * plain[0].item(), 0.75 * plain[1].item(), 1.5 * plain[2].item()]
    )


def test_pair_contrast_by_hand() -> None:
    """relu(margin + softDice(pred_A, target_B) - softDice(pred_A, target_A)) for each anchor."""
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
    model_loss, model_parts = torch.tensor(0.75), {"ce": torch.tensor([1.0, 2.0])}
    plain = combine_losses(model_loss, model_parts, global_batch=4)
    assert plain.total.item() == 0.75 and plain.parts == {"ce": 1.5} and plain.counts == {"ce": 2}
    contrast = torch.tensor([0.3, 0.1])
    both = combine_losses(model_loss, model_parts, 4, contrast=contrast, contrast_weight=3.0)
    assert both.total.item() == pytest.approx(0.75 + 3.0 * 0.4 / 4)
    assert both.parts["contrast"] == pytest.approx(0.2) and both.counts["contrast"] == 2
