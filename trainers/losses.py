"""The stage's additions to the model's loss (`core/model/losses.py`), and the batch loss the loop logs.

The model's own loss (answer CE, mask BCE, Dice, focal; `MedPLIBForCausalLM.forward`) is already
divided by the global batch; a stage adds, on the same scale, the router's supervision and load
balancing (stage IV) and the pair contrast of the grounding recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medplib.core.model.conversation import IGNORE_INDEX
from medplib.core.model.losses import MASK_PARTS, dice_loss

# Every part a `BatchLoss` may log, in the one order every worker sends them.
LOSS_PARTS = ("ce", *MASK_PARTS, "router", "contrast", "prompt_contrast", "balance", "head", "anchor")


def pair_contrast(
    mask_logits: Sequence[torch.Tensor | None],
    mask_targets: Sequence[torch.Tensor | None],
    keys: Sequence[tuple[str, str] | None],
    pairs: Sequence[tuple[str, str]],
    margin: float,
) -> torch.Tensor:
    """Per anchor, relu(margin + softDice(pred_A, target_B) - softDice(pred_A, target_A)) (n_anchors,).

    An anchor is a sample A of structure a whose batch also holds a sample B about the same image
    (`keys`: (image, structure), None for no grounding) with the partner structure b, (a, b) or
    (b, a) in `pairs`. The first mask of each sample is used. It is zero once A's mask is closer to
    its own target than to the partner's by the margin, so it only acts while the two masks are alike.
    """
    partners = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    found = {key: i for i, key in enumerate(keys) if key is not None and mask_logits[i] is not None}
    terms = []
    for (image, structure), anchor in found.items():
        for partner_structure in (b for a, b in partners if a == structure):
            partner = found.get((image, partner_structure))
            if partner is None or mask_targets[anchor] is None or mask_targets[partner] is None:
                continue
            logits = mask_logits[anchor][:1].float()
            own = 1 - dice_loss(logits, mask_targets[anchor][:1].float())
            other = 1 - dice_loss(logits, mask_targets[partner][:1].float())
            terms.append(F.relu(margin + other - own)[0])
    return torch.stack(terms) if terms else torch.zeros(0)


def answer_side(input_ids: torch.Tensor, attention_mask: torch.Tensor, im_end_id: int) -> torch.Tensor:
    """(B, T) the real tokens after the image: the question and the answer, the tokens the routing
    loss scores. The system prompt and the image come first and do not depend on the question, so no
    router could tell tasks apart there."""
    after_image = (input_ids == im_end_id).long().cumsum(dim=1) > 0
    return after_image & (input_ids != im_end_id) & attention_mask.bool()


def decision_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B,) each sample's last prompt token: the one whose output predicts the answer's first token."""
    return ((labels != IGNORE_INDEX).long().argmax(dim=1) - 1).clamp(min=0)


def routing_loss(
    layer_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    tokens: torch.Tensor,
    decision: torch.Tensor | None = None,
    decision_weight: float = 0.0,
    balanced: bool = False,
) -> torch.Tensor:
    """Per-sample cross-entropy of the router's gates against each sample's experts (batch,).

    `layer_logits` are each routed layer's gate logits over the flattened batch (B * T, K); `targets`
    (B, K) each sample's share of each expert (`expert_training.routing_targets`; a row of zeros:
    no expert, loss 0); `tokens` (B, T) which positions count. The mean is over a sample's counted
    tokens and the layers. `decision` (B,) is each sample's last prompt token, whose routed state
    predicts the answer's first token and so whether the answer is words or `<SEG>`: its
    cross-entropy is added at `decision_weight`. `balanced` weighs each sample by the inverse share
    of its expert in the batch, so that the one grounding request in five counts as much as the VQA.
    """
    batch, length = tokens.shape
    soft = targets.float()[:, None, :].expand(batch, length, -1).reshape(batch * length, -1)
    has_target = targets.sum(1) > 0
    weights = (tokens & has_target[:, None]).float()
    per_token = [
        F.cross_entropy(logits.float(), soft, reduction="none").view(batch, length) for logits in layer_logits
    ]
    counted = weights.sum(1).clamp(min=1)
    per_sample = torch.stack([(ce * weights).sum(1) for ce in per_token]).mean(0) / counted
    if decision is not None and decision_weight > 0:
        rows = torch.arange(batch, device=tokens.device)
        at_decision = torch.stack([ce[rows, decision] for ce in per_token]).mean(0)
        per_sample = per_sample + decision_weight * at_decision * has_target
    if balanced:
        shares = targets.float().sum(0)  # each expert's number of samples in the batch
        present = int((shares > 0).sum())
        scale = torch.where(shares > 0, targets.float().sum() / (present * shares.clamp(min=1e-6)), 0.0)
        per_sample = per_sample * (targets.float() @ scale)
    return per_sample


@dataclass(frozen=True)
class BatchLoss:
    total: torch.Tensor  # what is backpropagated: weighted parts summed over samples / global batch
    parts: dict[str, float]  # each part's mean over the samples that have it, for the log
    counts: dict[str, int]  # how many samples had each part


def add_load_balancing(
    loss: BatchLoss, balance: torch.Tensor, batch_size: int, global_batch: int
) -> BatchLoss:
    """`loss` plus the router's load-balancing loss of this micro-batch (weighted already), as its
    share of the global batch, so that accumulated micro-batches average it; logged as 'balance'."""
    return BatchLoss(
        loss.total + balance * batch_size / global_batch,
        {**loss.parts, "balance": float(balance.detach())},
        {**loss.counts, "balance": batch_size},
    )


def combine_losses(
    model_loss: torch.Tensor,
    model_parts: dict[str, torch.Tensor],
    global_batch: int,
    routing: torch.Tensor | None = None,
    routing_weight: float = 0.0,
    contrast: torch.Tensor | None = None,
    contrast_weight: float = 0.0,
    terms: dict[str, tuple[torch.Tensor, float]] | None = None,
) -> BatchLoss:
    """The batch loss: the model's (`MedPLIBOutput.loss`, already over the global batch, and its
    per-sample `loss_parts`) plus (stage IV) the per-sample routing loss and the pair contrast per
    anchor (`pair_contrast`); `terms` adds further per-sample (or per-anchor) losses by name, each with
    its weight."""
    parts = {name: float(values.mean()) for name, values in model_parts.items()}
    counts = {name: len(values) for name, values in model_parts.items()}
    added = None
    if routing is not None and routing_weight > 0:
        added = routing_weight * routing.sum()
        parts["router"] = float(routing.detach().mean())
        counts["router"] = len(routing)
    if contrast is not None and len(contrast) and contrast_weight > 0:
        weighted = contrast_weight * contrast.sum()
        added = weighted if added is None else added + weighted
        parts["contrast"] = float(contrast.detach().mean())
        counts["contrast"] = len(contrast)
    for name, (values, weight) in (terms or {}).items():
        if len(values) and weight > 0:
            weighted = weight * values.sum()
            added = weighted if added is None else added + weighted
            parts[name] = float(values.detach().mean())
            counts[name] = len(values)
    total = model_loss if added is None else model_loss + added / global_batch
    return BatchLoss(total, parts, counts)
