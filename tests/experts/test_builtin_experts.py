"""The built-in experts carry the paper's values and fit the model they are built into."""

from __future__ import annotations

from medplib.core.model import ControlToken, build_config
from medplib.core.plugins import get_experts
from medplib.experts.pixel_grounding.head import GroundingHead, PixelGroundingHead


def test_builtin_specs_carry_the_papers_values() -> None:
    experts = get_experts()
    vision, grounding = experts["vision_language"], experts["pixel_grounding"]
    assert set(vision.capabilities) == {"vqa", "region_vqa"} and grounding.capabilities == ("grounding",)
    assert (vision.adapter.r, vision.adapter.alpha, vision.adapter.dropout) == (16, 16, 0.05)
    assert (grounding.adapter.r, grounding.adapter.alpha) == (8, 16)
    assert set(grounding.adapter.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    assert vision.loss_weights.model_dump() == {"ce": 1, "bce": 0, "dice": 0, "focal": 0, "head": 0}
    assert grounding.loss_weights.model_dump() == {"ce": 1, "bce": 1, "dice": 5, "focal": 1, "head": 0}
    assert vision.head is None  # its head is the LM head
    assert vision.trains_on.accepts("region_vqa") and grounding.trains_on.accepts("grounding")


def test_builtin_special_tokens_are_the_models_control_tokens() -> None:
    experts = get_experts()
    declared = {
        token for name in ("vision_language", "pixel_grounding") for token in experts[name].special_tokens
    }
    assert declared == {token.value for token in ControlToken}


def test_grounding_head_factory_builds_the_seg_head_from_a_config() -> None:
    config = build_config("tiny")
    head = get_experts()["pixel_grounding"].build_head(config)
    assert isinstance(head, PixelGroundingHead) and isinstance(head.prompt, GroundingHead)
    assert head.prompt.fc1.in_features == config.text_config.hidden_size
    assert head.prompt.fc2.out_features == config.sam_config.prompt_embed_dim
    assert head.sam.image_encoder.img_size == config.sam_config.image_size
    assert get_experts()["vision_language"].build_head(config) is None
