"""The head factory named by the pixel-grounding spec: the `<SEG>` head sized from a model config."""

from __future__ import annotations

from medplib.core.model import MedPLIBConfig
from medplib.core.model.grounding import GroundingHead


def build_grounding_head(config: MedPLIBConfig) -> GroundingHead:
    """LLM hidden state -> SAM sparse-prompt embedding, as `MedPLIBForCausalLM.seg_head` is built."""
    return GroundingHead(
        config.text_config.hidden_size, config.sam_config.prompt_embed_dim, dense_film=config.seg_dense_film
    )
