"""SAM for the pixel-grounding expert: image encoder, prompt encoder and mask decoder.

The SAM modules are segment-anything's own, built as its `_build_sam` builds them but with every
size taken from `MedPLIBSamConfig`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from medplib.core.model import compat
from medplib.core.model.configuration_medplib import MedPLIBSamConfig
from medplib.core.model.sam_med2d import add_adapters


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
