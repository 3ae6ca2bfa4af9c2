"""What every MedPLIB model shares (`MedPLIBForCausalLM`, the routed-experts model): its config class,
weight initialisation, and checkpoints that round-trip exactly: safetensors, config.json and the
tokenizer, to a folder or an fsspec URI, every weight checked on the way back in."""

from __future__ import annotations

import os
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention as SamAttention
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from medplib.core.errors import CheckpointError, describe_key_problems
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.storage import local_folder, writable_folder
from medplib.core.model.tokenizer import control_token_ids, load_tokenizer

# Component name -> attribute path, for parameter counts and for loading reports.
COMPONENTS = {
    "vision_tower": "vision_tower",
    "projector": "projector",
    "language_model": "language_model",
    "region_encoder": "region_encoder",
    "seg_head": "seg_head",
    "sam_image_encoder": "sam.image_encoder",
    "sam_prompt_encoder": "sam.prompt_encoder",
    "sam_mask_decoder": "sam.mask_decoder",
}


class MedPLIBPreTrainedModel(PreTrainedModel):
    config_class = MedPLIBConfig
    base_model_prefix = "medplib"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """Expert heads (SAM and the `<SEG>` head among them) start from their modules' own defaults, the
        rest as transformers does.

        transformers' generic N(0, 0.02) would give SAM's mask and IoU tokens (embeddings, N(0, 1) by
        default) a norm of 0.2 instead of about 11 and leave its token attention uniform. Runs under
        transformers' init guard: a weight loaded from a checkpoint is never re-initialised.
        """
        if id(module) not in getattr(self, "_module_default_init", ()):
            super()._init_weights(module)
        elif hasattr(module, "reset_parameters"):  # Linear, Conv, LayerNorm, Embedding
            module.reset_parameters()
        elif isinstance(module, ImageEncoderViT) and module.pos_embed is not None:
            init.zeros_(module.pos_embed)
        elif isinstance(module, SamAttention) and module.use_rel_pos:
            init.zeros_(module.rel_pos_h)
            init.zeros_(module.rel_pos_w)
        elif isinstance(module, LayerNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Weights (safetensors), config and tokenizer to a folder or an fsspec URI."""
        if self.tokenizer is None:
            raise CheckpointError("this model has no tokenizer; a checkpoint without one cannot be used")
        with writable_folder(save_directory) as folder:
            super().save_pretrained(folder, **kwargs)
            self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any, **kwargs: Any
    ):
        """Load a checkpoint folder (path or fsspec URI); every weight must match, or CheckpointError."""
        kwargs.pop("output_loading_info", None)
        with local_folder(pretrained_model_name_or_path) as folder:
            kwargs["local_files_only"] = True  # nothing is ever downloaded
            model = cls._load_checked(pretrained_model_name_or_path, folder, *args, **kwargs)
            model.tokenizer = load_tokenizer(folder)
        # Loaded tensors alias the file's bytes at arbitrary offsets, and BLAS takes other kernels for
        # unaligned data: outputs would differ from the saved model's in the last bits. Own copies fix it.
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
        ids = control_token_ids(model.tokenizer)
        if ids != model.config.control_token_ids:
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: tokenizer ids {ids} differ from the config's"
            )
        vocab = model.tokenizer.get_vocab()
        wrong = {t: i for t, i in model.config.expert_token_ids.items() if vocab.get(t) != i}
        if wrong:
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: the tokenizer lacks the experts' tokens {wrong} "
                "at the ids the config records"
            )
        return model

    @classmethod
    def from_state_dict(
        cls,
        config: MedPLIBConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        fresh: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> MedPLIBPreTrainedModel:
        """Build from weights in memory, as `from_pretrained` does (meta device, nothing initialised twice).

        Weights of the components named in `fresh` (keys of `COMPONENTS`) may be absent and are
        initialised; any other missing, unexpected or mis-shaped key raises CheckpointError.
        """
        prefixes = tuple(f"{COMPONENTS[name]}." for name in fresh)
        return cls._load_checked(
            "state dict", None, config=config, state_dict=state_dict, fresh=prefixes, **kwargs
        )

    @classmethod
    def _load_checked(
        cls, source: object, folder: object, *args: Any, fresh: tuple[str, ...] = (), **kwargs: Any
    ):
        from safetensors import SafetensorError

        try:
            # Mis-shaped weights are reported in `info` (and refused below) instead of an unnamed error.
            model, info = super().from_pretrained(
                folder, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"cannot load {source}: {exc}") from None
        info["missing_keys"] = [key for key in info["missing_keys"] if not key.startswith(fresh)]
        problems = {
            k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]
        }
        if problems:
            raise CheckpointError(describe_key_problems(source, problems))
        return model
