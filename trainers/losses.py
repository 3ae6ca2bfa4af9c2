"""The training losses: cross-entropy on answer tokens, and BCE, Dice and focal loss on masks.

Every loss is computed per sample and the batch loss is their weighted sum divided by the size of
the *global* batch (all micro-batches of all workers in one optimizer step). That normalisation is
what makes gradient accumulation and data parallelism exact: the sum of the workers' micro-batch
losses is the loss of one process that saw the whole batch. A sample's CE is the mean over its own
answer tokens, so a one-word closed answer counts as much as a long description; a sample without a
mask adds nothing to the mask losses. Masks are scored at the image's original size, where the
metrics score them, not at SAM's low resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def routing_loss(
    layer_logits: Sequence[torch.Tensor], targets: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Per-sample cross-entropy of the router's gates against each sample's expert (batch,).

    `layer_logits` are each routed layer's gate logits over the flattened batch (B * T, K); `targets`
    (B,) the expert index each sample belongs to (-1: none, loss 0); `tokens` (B, T) which positions
    count. The mean is over a sample's counted tokens and the layers.
    """
    batch, length = tokens.shape
    labels = targets[:, None].expand(batch, length).reshape(-1).clamp(min=0)
    weights = (tokens & (targets[:, None] >= 0)).float()
    per_layer = [
        (F.cross_entropy(logits.float(), labels, reduction="none").view(batch, length) * weights).sum(1)
        for logits in layer_logits
    ]
    return torch.stack(per_layer).mean(0) / weights.sum(1).clamp(min=1)


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
    ce: torch.Tensor,
    mask_logits: Sequence[torch.Tensor | None],
    mask_targets: Sequence[torch.Tensor | None],
    weights: LossWeights,
    global_batch: int,
    routing: torch.Tensor | None = None,
    routing_weight: float = 0.0,
    contrast: torch.Tensor | None = None,
    contrast_weight: float = 0.0,
    terms: dict[str, tuple[torch.Tensor, float]] | None = None,
) -> BatchLoss:
    """The batch loss from per-sample CE (batch,) and each sample's predicted and target masks, plus
    (stage IV) the per-sample routing loss and the pair contrast per anchor (`pair_contrast`); `terms`
    adds further per-sample (or per-anchor) losses by name, each with its weight.

    Mask parts are each sample's mean over its masks; parts whose weight is 0 are not computed.
    """
    total = weights.ce * ce.sum()
    parts = {"ce": float(ce.detach().mean())}
    counts = {"ce": len(ce)}
    if routing is not None and routing_weight > 0:
        total = total + routing_weight * routing.sum()
        parts["router"] = float(routing.detach().mean())
        counts["router"] = len(routing)
    if contrast is not None and len(contrast) and contrast_weight > 0:
        total = total + contrast_weight * contrast.sum()
        parts["contrast"] = float(contrast.detach().mean())
        counts["contrast"] = len(contrast)
    for name, (values, weight) in (terms or {}).items():
        if len(values) and weight > 0:
            total = total + weight * values.sum()
            parts[name] = float(values.detach().mean())
            counts[name] = len(values)
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
            summed = torch.stack(values).sum()
            total = total + getattr(weights, name) * summed
            parts[name] = float(summed.detach()) / len(values)
            counts[name] = len(values)
    return BatchLoss(total / global_batch, parts, counts)
