import math
from types import SimpleNamespace

import pytest
import torch

from medplib.experts.pixel_grounding.head import GroundingHead
from medplib.trainers.prompt_contrast import PromptContrast, prompt_contrast, prompt_terms
from medplib.trainers.stages import stage_spec


def test_prompt_contrast_by_hand() -> None:
    # Three prompts: two "left" along e0, one "right" along e1 (layer norm keeps these directions).
    e0 = torch.tensor([1.0, -1.0, 0.0, 0.0])
    e1 = torch.tensor([0.0, 0.0, 1.0, -1.0])
    prompts = torch.stack([e0, e0, e1])
    values = prompt_contrast(prompts, ["left", "left", "right"], temperature=0.5)
    # Anchors with a positive: the two "left" prompts; cosine 1 with each other, 0 with "right".
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
    assert values.shape == (2,)
    assert values.tolist() == pytest.approx([expected, expected], rel=1e-5)


def test_prompt_contrast_falls_as_structures_separate() -> None:
    torch.manual_seed(0)
    labels = ["left", "right", "left", "right"]
    alike = torch.randn(1, 16).repeat(4, 1) + 0.01 * torch.randn(4, 16)
    apart = torch.stack([torch.randn(16)] * 2 + [torch.randn(16)] * 2)[[0, 2, 1, 3]]
    assert prompt_contrast(apart, labels, 0.1).mean() < prompt_contrast(alike, labels, 0.1).mean()


def test_prompt_contrast_needs_a_positive() -> None:
    values = prompt_contrast(torch.randn(2, 8), ["left", "right"], temperature=0.1)
    assert values.shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        prompt_contrast(torch.randn(3, 8), ["left"], temperature=0.1)


def test_prompt_terms_reads_the_first_seg_state_of_grounding_requests() -> None:
    spec = stage_spec("3").model_copy(update={"prompt_contrast": PromptContrast(weight=2.0)})
    width = 32
    tiny_model = SimpleNamespace(seg_head=GroundingHead(width, 16))
    states = [torch.randn(1, width), torch.randn(0, width), torch.randn(1, width), torch.randn(1, width)]
    keys = [("a", "left"), None, ("b", "left"), ("a", "right")]
    terms = prompt_terms(tiny_model, states, keys, spec)
    values, weight = terms["prompt_contrast"]
    assert weight == 2.0 and values.shape == (2,)  # the two "left" requests are anchors
    assert prompt_terms(tiny_model, states, keys, stage_spec("3")) == {}
