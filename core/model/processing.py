"""From requests (an image, a conversation, region masks) to the model's batch tensors, and back.

`MedPLIBProcessor` lays each conversation out with the template, pads the batch (left for
generation, right for training), and prepares the image for CLIP and for SAM and every region mask
for the region encoder. Regions are bool masks on the image grid; turning points, boxes and shapes
into masks is the region prompts' job (`prompt.to_mask(h, w)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.model import compat
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.conversation import (
    IGNORE_INDEX,
    EncodedConversation,
    Turn,
    decode_answer,
    encode_conversation,
)
from medplib.core.model.grounding import preprocess_sam_image
from medplib.core.model.vision import preprocess_clip_image, preprocess_region_mask


@dataclass(frozen=True)
class Request:
    """What the model consumes of one request: an image, the conversation about it (the last turn
    unanswered, or answered to be prefilled), the masks of the regions its questions mark, in order,
    and what a generated answer must hold. Training builds them from samples, the assistant from a
    `Query` (`core/prompts.py`)."""

    pixels: np.ndarray  # RGB uint8 (H, W, 3)
    turns: Sequence[Turn]
    regions: Sequence[np.ndarray] = field(default_factory=tuple)  # bool (H, W) each
    require_seg: bool = False  # grounding: the answer must hold a <SEG>
    require_token: int | None = None  # a capability asked for: the answer must hold this expert token
    require_at_start: bool = False  # ... and opens with it (else it goes where the answer would end)

    @property
    def answered(self) -> bool:
        """The last turn carries a known answer: generation prefills it with the prompt, not decodes it."""
        return bool(self.turns) and self.turns[-1].assistant is not None


class MedPLIBProcessor:
    def __init__(self, config: MedPLIBConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def __call__(
        self, requests: Sequence[Request], *, padding_side: Literal["left", "right"] = "left"
    ) -> dict[str, Any]:
        """Keyword arguments for `model.forward` / `model.generate` (labels included)."""
        if not requests:
            raise InvalidInputError("no requests to process")
        encoded, pixel_values, region_masks, sam_images, sam_sizes, original_sizes = [], [], [], [], [], []
        for request in requests:
            conversation, masks = self.encode_request(request)
            encoded.append(conversation)
            region_masks.append(masks)
            pixel_values.append(self.clip_pixels(request.pixels))
            sam_image, sam_size = self.sam_pixels(request.pixels)
            sam_images.append(sam_image)
            sam_sizes.append(sam_size)
            original_sizes.append(request.pixels.shape[:2])
        input_ids, attention_mask, labels = self.pad(encoded, padding_side)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack(pixel_values),
            "region_masks": region_masks,
            "sam_pixel_values": torch.stack(sam_images),
            "sam_input_sizes": sam_sizes,
            "original_sizes": original_sizes,
        }

    def encode_request(self, request: Request) -> tuple[EncodedConversation, torch.Tensor]:
        """The conversation's ids and labels, and its region masks (R, S, S) on the CLIP input frame."""
        conversation = self.encode_turns(request.turns)
        if conversation.num_regions != len(request.regions):
            raise RegionError(
                f"{conversation.num_regions} regions in the questions, {len(request.regions)} masks given"
            )
        height, width = request.pixels.shape[:2]
        size = self.config.vision_config.image_size
        masks = []
        for mask in request.regions:
            if mask.shape != (height, width):
                raise RegionError(
                    f"a region mask of shape {mask.shape} does not fit a {width}x{height} image"
                )
            if self.config.compat == "medplib":
                masks.append(compat.region_grid(mask.astype(bool)))
            else:
                masks.append(preprocess_region_mask(mask.astype(bool), image_size=size))
        if self.config.compat == "medplib" and not masks:
            size = compat.CLIP_CANVAS // compat.CLIP_PATCH
        return conversation, torch.stack(masks) if masks else torch.zeros(0, size, size)

    def encode_turns(self, turns: Sequence[Turn]) -> EncodedConversation:
        """Ids and labels of a conversation by the model's template (MedPLIB's under `compat: medplib`,
        whose labels are all ignored: it serves inference only)."""
        if self.config.compat == "medplib":
            ids, num_regions = compat.encode_turns(self.tokenizer, turns, self.config)
            return EncodedConversation(ids, [IGNORE_INDEX] * len(ids), num_regions)
        return encode_conversation(self.tokenizer, turns, num_image_tokens=self.config.num_image_tokens)

    def clip_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """The CLIP tower's input (3, S, S) of an RGB uint8 image."""
        preprocess = (
            compat.preprocess_clip_image if self.config.compat == "medplib" else preprocess_clip_image
        )
        return preprocess(
            pixels,
            image_size=self.config.vision_config.image_size,
            mean=self.config.image_mean,
            std=self.config.image_std,
        )

    def sam_pixels(self, pixels: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """SAM's input (3, S, S) of an RGB uint8 image and the (h, w) it covers before padding."""
        sam = self.config.sam_config
        if self.config.compat == "medplib":
            return compat.preprocess_sam_image(
                pixels, image_size=sam.image_size, mean=sam.pixel_mean, std=sam.pixel_std
            )
        return preprocess_sam_image(pixels, sam)

    def pad(
        self, encoded: Sequence[EncodedConversation], side: str, *, prefix: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, attention mask and labels of conversations padded to one length.

        `prefix` > 0 keeps each row's first `prefix` tokens (a prefix every row shares in length, such
        as the template up to the image) in place and puts left padding after them, so a KV cache of
        those prefixes lines up with the batch.
        """
        length = max(len(c.input_ids) for c in encoded)
        fillers = (self.tokenizer.pad_token_id, IGNORE_INDEX, 0)
        rows: tuple[list[list[int]], ...] = ([], [], [])  # ids, labels, mask: lists made tensors at once
        for conversation in encoded:
            n = len(conversation.input_ids)
            # The padding goes after the first `head` tokens: the prefix, or none (left), or all (right).
            head = prefix if prefix else (0 if side == "left" else n)
            gap = length - n
            columns = (list(conversation.input_ids), list(conversation.labels), [1] * n)
            for out, values, filler in zip(rows, columns, fillers, strict=True):
                out.append(values[:head] + [filler] * gap + values[head:])
        input_ids, labels, attention_mask = (torch.tensor(values, dtype=torch.long) for values in rows)
        return input_ids, attention_mask, labels

    def decode(self, sequences: torch.Tensor) -> list[str]:
        """Generated ids (B, L) -> answer text per row, `<SEG>` kept where a mask was made."""
        return [decode_answer(self.tokenizer, row.tolist()) for row in sequences]
