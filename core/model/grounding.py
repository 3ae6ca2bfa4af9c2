"""Grounding: the `<SEG>` head and SAM (image encoder, prompt encoder, mask decoder).

The hidden state that predicts a `<SEG>` goes through `GroundingHead` (a 2-layer MLP, as LISA's
`text_hidden_fcs`) to SAM's prompt width and becomes the one sparse prompt of SAM's mask decoder;
the dense prompt is SAM's no-mask embedding. The SAM modules are segment-anything's own, built as
its `_build_sam` builds them but with every size taken from `MedPLIBSamConfig`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from medplib.core.errors import InvalidInputError
from medplib.core.model import compat
from medplib.core.model.configuration_medplib import MedPLIBSamConfig
from medplib.core.model.sam_med2d import add_adapters


class FiLMLinear(nn.Linear):
    """A linear map with N(0, 1/width) weights and zero bias: unit-variance inputs give unit-variance
    modulation from the first step. Its own `reset_parameters`, so every init path (construction,
    transformers' guarded init of missing weights) gives the same."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.in_features**-0.5)
        nn.init.zeros_(self.bias)


class DensePromptFiLM(nn.Module):
    """The `<SEG>` prompt also conditions SAM's dense prompt, FiLM-style (`MedPLIBConfig.seg_dense_film`).

    dense = no-mask embedding + PE + scale(q) * PE + shift(q), q the layer-normalised sparse prompt and
    PE SAM's dense positional encoding (C, g, g). A randomly initialised SAM's mask features carry no
    absolute position, and its decoder learns to ignore its sparse prompt within a few steps; added
    here, the prompt modulates the positional features every mask pixel is computed from, which the
    decoder cannot route around, so left and right of a symmetric image become separable.
    """

    def __init__(self, prompt_embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(prompt_embed_dim, elementwise_affine=False)
        self.scale = FiLMLinear(prompt_embed_dim, prompt_embed_dim)
        self.shift = FiLMLinear(prompt_embed_dim, prompt_embed_dim)

    def forward(self, prompts: torch.Tensor, no_mask: torch.Tensor, positional: torch.Tensor) -> torch.Tensor:
        """(n, C) prompts, (C,) no-mask embedding, (C, g, g) PE -> (n, C, g, g) dense prompts."""
        q = self.norm(prompts)
        scale, shift = self.scale(q)[..., None, None], self.shift(q)[..., None, None]
        return no_mask[:, None, None] + positional + scale * positional + shift


class GroundingHead(nn.Module):
    """LLM hidden state -> SAM sparse prompt embedding (and, with `dense_film`, its dense prompt)."""

    def __init__(self, hidden_size: int, prompt_embed_dim: int, dense_film: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_size, prompt_embed_dim)
        self.dense_film = DensePromptFiLM(prompt_embed_dim) if dense_film else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))

    def dense_prompts(self, prompts: torch.Tensor, prompt_encoder: PromptEncoder) -> torch.Tensor | None:
        """The dense prompts (n, C, g, g) for sparse `prompts` (n, C); None: SAM's no-mask embedding."""
        if self.dense_film is None:
            return None
        # segment-anything builds its positional encoding in float32; autocast bridges a half-precision SAM.
        half = prompts.dtype != torch.float32
        with torch.autocast(prompts.device.type, dtype=prompts.dtype, enabled=half):
            positional = prompt_encoder.get_dense_pe()[0].to(prompts.dtype)
        return self.dense_film(prompts, prompt_encoder.no_mask_embed.weight[0], positional)


class SamGrounding(nn.Module):
    """SAM's three parts, injected as `segment_anything.modeling.Sam` takes them.

    Attribute names match SAM checkpoints (`image_encoder.`, `prompt_encoder.`, `mask_decoder.`), so
    a SAM state dict loads under the `sam.` prefix without renaming.
    """

    def __init__(
        self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.medplib_postprocess = False  # `MedPLIBSamConfig.mask_postprocess`

    def decode(
        self, image_embedding: torch.Tensor, prompts: torch.Tensor, dense: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's embedding (1, C, g, g) and n prompts (n, C) -> low-res mask logits (n, 4g, 4g) and
        SAM's predicted IoU of each mask (n,). `dense` (n, C, g, g) defaults to the no-mask embedding."""
        sparse = prompts[:, None, :]
        if dense is None:
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense = dense.expand(len(prompts), -1, *self.prompt_encoder.image_embedding_size)
        dtype = dense.dtype
        # segment-anything builds its positional encoding in float32; autocast bridges a half-precision SAM.
        with torch.autocast(image_embedding.device.type, dtype=dtype, enabled=dtype != torch.float32):
            low_res, iou = self.mask_decoder(
                image_embeddings=image_embedding,
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return low_res[:, 0], iou[:, 0]

    def postprocess(
        self, low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(n, h, w) logits -> (n, H, W) at the original image size (`Sam.postprocess_masks`)."""
        if self.medplib_postprocess:
            return compat.postprocess_masks(low_res, input_size, original_size)
        side = self.image_encoder.img_size
        masks = F.interpolate(low_res[:, None], (side, side), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)[:, 0]


def build_sam(config: MedPLIBSamConfig) -> SamGrounding:
    grid = config.embedding_size
    sam = SamGrounding(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=config.use_rel_pos,
            window_size=config.window_size,
            global_attn_indexes=tuple(config.global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    )
    if config.adapter_hidden_dim:
        add_adapters(sam.image_encoder, config.adapter_hidden_dim)
    sam.medplib_postprocess = config.mask_postprocess == "medplib"
    return sam


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
