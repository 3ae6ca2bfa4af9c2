"""Outputs of the image encoders a stage keeps frozen, computed once per image and reused every epoch.

The embedded dataset has about 140 images behind 1,500 samples, and a stage runs several epochs, so
a frozen CLIP tower or SAM image encoder would otherwise encode each image dozens of times. The loop
looks each image of a batch up by the content of its preprocessed tensor (what the encoder would have
been given) and hands the model the cached outputs (`embed_inputs(image_features=...)`,
`predict_masks(image_embeddings=...)`).

`fill` encodes every image one at a time before training starts. That keeps the cached values
independent of which images happen to share a batch (a batch of one and a batch of eight take
different BLAS kernels and differ in the last bits), so a resumed run sees exactly the features the
uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np
import torch

from medplib.core.model import MedPLIBForCausalLM
from medplib.core.model.grounding import preprocess_sam_image
from medplib.core.model.vision import preprocess_clip_image


def _key(row: torch.Tensor) -> bytes:
    return hashlib.blake2b(row.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()


class _Lookup:
    """Per-row memo of one encoder: rows seen before come from the table, new rows are encoded."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.encode = encode
        self.table: dict[bytes, torch.Tensor] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        keys = [_key(row) for row in batch]
        for index, key in enumerate(keys):
            if key not in self.table:
                with torch.no_grad():
                    self.table[key] = self.encode(batch[index : index + 1])[0]
        return torch.stack([self.table[key] for key in keys])


class FrozenEncoderCache:
    """Caches CLIP patch features (`clip`) and SAM image embeddings (`sam`) of one model."""

    def __init__(self, model: MedPLIBForCausalLM, *, clip: bool, sam: bool) -> None:
        self.model = model
        self.clip = _Lookup(model.image_features) if clip else None
        self.sam = _Lookup(model.sam_image_embeddings) if sam else None

    def fill(self, images: Iterable[np.ndarray]) -> int:
        """Encode each distinct image once; returns how many were encoded."""
        config = self.model.config
        count = 0
        for pixels in images:
            if self.clip is not None:
                clip_input = preprocess_clip_image(
                    pixels,
                    image_size=config.vision_config.image_size,
                    mean=config.image_mean,
                    std=config.image_std,
                )
                self.clip(clip_input[None].to(self.model.device))
            if self.sam is not None:
                sam_input, _ = preprocess_sam_image(pixels, config.sam_config)
                self.sam(sam_input[None].to(self.model.device))
            count += 1
        return count

    def clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The cached CLIP features of a batch (what `embed_inputs` takes as `image_features`)."""
        return self.clip(pixel_values) if self.clip is not None else None

    def sam_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The cached SAM embeddings of a batch (what `predict_masks` takes as `image_embeddings`)."""
        return self.sam(sam_pixel_values) if self.sam is not None else None
