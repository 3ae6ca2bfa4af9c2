"""The modality head: the hidden state at `<MOD>` -> one logit per modality."""

from __future__ import annotations

from typing import Any

from torch import nn

from medplib_expert_modality import MODALITIES


def build_modality_head(config: Any) -> nn.Module:
    """Sized from the composed model's config: MedPLIB's `text_config`, or a plain LLaMA config."""
    hidden_size = getattr(config, "text_config", config).hidden_size
    return nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, len(MODALITIES)))
