"""Grounding inputs: an image resized, normalised and padded as SAM takes it.

The `<SEG>` head and SAM itself are the pixel-grounding expert's (`experts/pixel_grounding/`), built
through its spec like any expert's head; what the processor needs to feed SAM stays here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medplib.core.errors import InvalidInputError
from medplib.core.model.configuration_medplib import MedPLIBSamConfig


def sam_input_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) of an image resized so its longest side is `image_size` (`ResizeLongestSide`)."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_sam_image(
    pixels: np.ndarray, config: MedPLIBSamConfig
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 (H, W, 3) -> SAM input (3, S, S) and the (h, w) the image covers before padding.

    As `SamPredictor` does: resize the longest side to S (`ResizeLongestSide`), normalise with SAM's
    pixel mean and std, pad bottom and right with zeros.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidInputError(f"expected RGB uint8 pixels (H, W, 3), got {pixels.dtype} {pixels.shape}")
    new_h, new_w = sam_input_size(*pixels.shape[:2], config.image_size)
    resized = np.asarray(
        Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32
    )
    tensor = torch.from_numpy(resized).permute(2, 0, 1)
    tensor = (tensor - torch.tensor(config.pixel_mean).view(3, 1, 1)) / torch.tensor(config.pixel_std).view(
        3, 1, 1
    )
    padded = F.pad(tensor, (0, config.image_size - new_w, 0, config.image_size - new_h))
    return padded, (new_h, new_w)
