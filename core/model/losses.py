"""The model's objective: cross-entropy on answer tokens, and BCE, Dice and focal loss on masks.

Every loss is computed per sample, and `MedPLIBForCausalLM.forward` sums them, weighted, and divides by
a given count of samples (in training the *global* batch: all micro-batches of all workers in one
optimizer step). That normalisation is what makes gradient accumulation and data parallelism exact:
the sum of the workers' micro-batch losses is the loss of one process that saw the whole batch. A
sample's CE is the mean over its own answer tokens, so a one-word closed answer counts as much as a
long description; a sample without a mask adds nothing to the mask losses. Masks are scored at the
image's original size, where the metrics score them, not at SAM's low resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medplib.core.expert_spec import LossWeights
from medplib.core.model.conversation import IGNORE_INDEX

MASK_PARTS = ("bce", "dice", "focal")


def answer_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, batch: int
) -> torch.Tensor:
    """Per-sample mean CE (batch,) from the logits of the supervised positions only.

    `logits` (N, V) are the predictions of `labels` (N,), flattened over the batch; `rows` (N,) says
    which sample each belongs to. A sample without supervised tokens gets 0.
    """
    token_loss = F.cross_entropy(logits.float(), labels, reduction="none")
    sums = token_loss.new_zeros(batch).index_add(0, rows, token_loss)
    counts = torch.bincount(rows, minlength=batch).clamp(min=1)
    return sums / counts


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the next token is supervised: (row, position) of each predicting position, and its label.

    Position t predicts label t + 1; only answers (and their `</s>`) carry labels.
    """
    targets = labels[:, 1:]
    rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    return rows, positions, targets[rows, positions]


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask mean binary cross-entropy: (n, H, W) logits and 0/1 targets -> (n,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss 1 - (2 |P T| + s) / (|P| + |T| + s), P = sigmoid(logits) -> (n,).

    The smoothing `s` (in pixels) keeps an empty target finite: predicting nothing scores 0 there.
    """
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(1)
    return 1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-mask mean sigmoid focal loss (Lin et al. 2017, as torchvision's `sigmoid_focal_loss`) -> (n,)."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probs * target + (1 - probs) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).flatten(1).mean(1)


MASK_LOSSES = {"bce": bce_loss, "dice": dice_loss, "focal": focal_loss}


def targeted_mask_logits(
    predictions: Sequence[Any] | None, mask_targets: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Per sample, its predicted masks' logits (`MaskPrediction.logits`) where it has a target mask."""
    predictions = predictions or [None] * len(mask_targets)
    return [
        p.logits if p is not None and t is not None else None
        for p, t in zip(predictions, mask_targets, strict=True)
    ]


def weighted_loss(
    ce: torch.Tensor,
    mask_logits: Sequence[torch.Tensor | None],
    mask_targets: Sequence[torch.Tensor | None],
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum over samples of per-sample CE (batch,) and each sample's mask losses, and
    each part's per-sample values (detached; mask parts only over the samples with a target).

    Mask parts are each sample's mean over its masks; parts whose weight is 0 are not computed.
    """
    total = weights.ce * ce.sum()
    parts = {"ce": ce.detach()}
    used = [name for name in MASK_PARTS if getattr(weights, name) > 0]
    per_part: dict[str, list[torch.Tensor]] = {name: [] for name in used}
    for logits, target in zip(mask_logits, mask_targets, strict=True):
        if target is None or logits is None:
            continue
        target = target.to(logits.dtype)
        for name in used:
            per_part[name].append(MASK_LOSSES[name](logits.float(), target.float()).mean())
    for name, values in per_part.items():
        if values:
            stacked = torch.stack(values)
            total = total + getattr(weights, name) * stacked.sum()
            parts[name] = stacked.detach()
    return total, parts
