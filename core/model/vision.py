"""The vision side of the model: CLIP preprocessing, the vision tower's features and the projector.

An image is centre-padded to a square with the CLIP mean colour (LLaVA-1.5's `expand2square`),
resized to the tower's input size and normalised. Region masks go through the same padding and
resize, so a mask and the image it marks stay aligned on the tower's grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from medplib.core.errors import InvalidInputError, RegionError


def _square_padding(height: int, width: int) -> tuple[int, int, int]:
    """(side, top, left): the square an image is centred in, and where the image starts in it."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def preprocess_clip_image(
    pixels: np.ndarray, *, image_size: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float (3, image_size, image_size) for the CLIP tower."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidInputError(f"expected RGB uint8 pixels (H, W, 3), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    side, top, left = _square_padding(height, width)
    fill = tuple(int(255 * m) for m in mean)  # truncated, as LLaVA-1.5 computes it
    square = Image.new("RGB", (side, side), fill)
    square.paste(Image.fromarray(pixels), (left, top))
    resized = np.asarray(square.resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.float32)
    tensor = torch.from_numpy(resized / 255.0).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess_region_mask(mask: np.ndarray, *, image_size: int) -> torch.Tensor:
    """Bool (H, W) mask -> float (image_size, image_size) coverage on the CLIP input frame.

    Area resampling keeps a region smaller than one output pixel as a fractional coverage instead
    of dropping it.
    """
    if mask.ndim != 2:
        raise RegionError(f"a region mask must be 2-D (H, W), got shape {mask.shape}")
    if not mask.any():
        raise RegionError("a region mask is empty: it marks no pixel of the image")
    height, width = mask.shape
    side, top, left = _square_padding(height, width)
    square = torch.zeros(1, 1, side, side)
    square[0, 0, top : top + height, left : left + width] = torch.from_numpy(mask.astype(np.float32))
    return F.interpolate(square, size=(image_size, image_size), mode="area")[0, 0]


def build_vision_tower(config: CLIPVisionConfig) -> CLIPVisionModel:
    return CLIPVisionModel(config)


def select_image_features(tower: CLIPVisionModel, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch features (B, grid*grid, C) from hidden layer `layer` (LLaVA: -2), the CLS token dropped.

    `layer` indexes the tower's hidden states as `output_hidden_states` does (0: the embeddings, k:
    after block k); only the blocks up to it run (LLaVA's -2 skips the last block's work).
    """
    vision = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
    blocks = vision.encoder.layers
    if not -len(blocks) - 1 <= layer <= len(blocks):
        raise InvalidInputError(f"vision feature layer {layer} is outside the tower's {len(blocks)} blocks")
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    for block in blocks[: layer % (len(blocks) + 1)]:
        hidden = block(hidden, None)
    return hidden[:, 1:]


class MultiModalProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear, GELU, Linear from the tower width to the LLM width.

    Named like transformers' `LlavaMultiModalProjector`, so LLaVA checkpoints load without renaming.
    """

    def __init__(
        self, vision_hidden_size: int, text_hidden_size: int, norm: bool = False, standardize: bool = False
    ) -> None:
        super().__init__()
        # See `MedPLIBConfig.image_feature_standardize`; None for LLaVA's projector.
        self.standardize = nn.BatchNorm1d(vision_hidden_size) if standardize else None
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)
        # See `MedPLIBConfig.visual_token_norm`; LLaVA has none, so its checkpoints load unchanged.
        self.norm = nn.LayerNorm(text_hidden_size) if norm else None

    def train(self, mode: bool = True) -> MultiModalProjector:
        super().train(mode)
        if self.standardize is not None and not self.standardize.weight.requires_grad:
            self.standardize.eval()  # a stage that freezes the projector keeps its statistics too
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.standardize is not None:
            features = self.standardize(features.flatten(0, -2)).view_as(features)
        tokens = self.linear_2(self.act(self.linear_1(features)))
        return tokens if self.norm is None else self.norm(tokens)
