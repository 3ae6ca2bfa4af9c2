"""Fixtures for the model tests: the tiny preset (seeded), its processor, and a small RGB image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.core.model import MedPLIBForCausalLM, MedPLIBProcessor, build_medplib


@pytest.fixture
def tiny_model() -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    return build_medplib("tiny").eval()


@pytest.fixture
def processor(tiny_model: MedPLIBForCausalLM) -> MedPLIBProcessor:
    return MedPLIBProcessor(tiny_model.config, tiny_model.tokenizer)


@pytest.fixture
def image() -> np.ndarray:
    """A 97 x 130 RGB image: not square and not a multiple of any patch, so padding and resizing matter."""
    return np.random.default_rng(0).integers(0, 256, (97, 130, 3), dtype=np.uint8)


@pytest.fixture
def box_mask() -> np.ndarray:
    mask = np.zeros((97, 130), dtype=bool)
    mask[10:40, 20:60] = True
    return mask
