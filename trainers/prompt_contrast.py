"""A contrast on the `<SEG>` prompts themselves: requests about one structure alike, others apart.

The mask contrast (`losses.pair_contrast`) only acts through the mask decoder: while the decoder
returns one mask per image its gradient towards different prompts is small, and the mask loss pulls
the prompts of one image together. This loss acts on the prompt SAM receives (layer-normalised, as
the FiLM dense conditioning reads it), so the `<SEG>` state must carry the structure's name whatever
the wording of the request: a supervised contrastive loss (Khosla et al. 2020) over the grounding
requests of a micro-batch, labelled by the structure they ask for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from medplib.trainers.stages import StageSpec


class PromptContrast(BaseModel):
    """Weight and temperature of `prompt_contrast` (`StageSpec.prompt_contrast`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, ge=0)
    temperature: float = Field(0.1, gt=0)


def prompt_contrast(prompts: torch.Tensor, labels: Sequence[str], temperature: float) -> torch.Tensor:
    """Per anchor with at least one positive, the supervised contrastive loss of its prompt (n_anchors,).

    `prompts` (n, C) are the sparse prompts of n grounding requests and `labels` the structure each
    asks for. Prompts are layer-normalised, then compared by cosine similarity / `temperature`; an
    anchor's loss is the mean over its positives p of -log(exp(s_ap) / sum over a' != a of exp(s_aa')).
    An anchor without a positive in the batch adds nothing (it still serves as a negative).
    """
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    if len(prompts) < 2:
        return prompts.new_zeros(0)
    z = F.normalize(F.layer_norm(prompts.float(), prompts.shape[-1:]), dim=-1)
    similarity = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = similarity.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    codes = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    ids = torch.tensor([codes[label] for label in labels], device=z.device)
    positive = (ids[:, None] == ids[None, :]) & ~eye
    anchors = positive.any(dim=1)
    if not anchors.any():
        return prompts.new_zeros(0)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1).clamp(min=1)
    return per_anchor[anchors]


def prompt_terms(
    model: torch.nn.Module,
    seg_hidden: Sequence[torch.Tensor],
    pair_keys: Sequence[tuple[str, str] | None],
    spec: StageSpec,
) -> dict[str, tuple[torch.Tensor, float]]:
    """The stage's prompt contrast over a micro-batch, as `losses.combine_losses` takes extra terms:
    {} when the stage has none. The first `<SEG>` of each grounding request is its prompt."""
    options = spec.prompt_contrast
    if options is None or options.weight == 0:
        return {}
    found = [
        (states[0], key[1]) for states, key in zip(seg_hidden, pair_keys, strict=True) if key and len(states)
    ]
    if len(found) < 2:
        return {}
    prompts = model.seg_head(torch.stack([state for state, _ in found]))
    values = prompt_contrast(prompts, [label for _, label in found], options.temperature)
    return {"prompt_contrast": (values, options.weight)}
