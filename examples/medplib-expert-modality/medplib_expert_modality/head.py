"""The modality head: the hidden state that predicts `<MOD>` -> one logit per modality."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.expert_heads import ExpertHead
from medplib_expert_modality.outputs import MODALITIES, ModalityPrediction


class ModalityHead(ExpertHead):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.classify = nn.Linear(hidden_size, len(MODALITIES))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(hidden_states))

    def target(self, sample: Any) -> torch.Tensor | None:
        """The sample's modality label as a class index; None for a modality the head does not know."""
        modality = getattr(sample, "modality", None)
        return torch.tensor(MODALITIES.index(modality)) if modality in MODALITIES else None

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction.float(), target, reduction="none")

    def to_outputs(self, prediction: torch.Tensor) -> list[ModalityPrediction]:
        probabilities = prediction.float().softmax(dim=-1).cpu()
        outputs = []
        for row in probabilities:
            best = int(row.argmax())
            outputs.append(
                ModalityPrediction(
                    modality=MODALITIES[best],
                    probability=round(float(row[best]), 4),
                    probabilities={m: round(float(p), 4) for m, p in zip(MODALITIES, row, strict=True)},
                )
            )
        return outputs


def build_modality_head(config: Any) -> ModalityHead:
    """Sized from the composed model's config: MedPLIB's `text_config`, or a plain LLaMA config."""
    return ModalityHead(getattr(config, "text_config", config).hidden_size)
