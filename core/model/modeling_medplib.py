"""The composed MedPLIB model: CLIP tower, projector, LLaMA, region encoder, `<SEG>` head and SAM.

Reading order: `embed_inputs` splices the projected image tokens over the `<image>` placeholders and
one region token over each `<region_feat>`; `forward` runs the LLM on those embeddings (logits, CE
loss on `labels`, the hidden states that predict each `<SEG>`) and, given SAM inputs, turns every
`<SEG>` into a mask with `predict_masks`; `generate` decodes with the KV cache (`generation.py`).

The LLM stays a plain `LlamaForCausalLM` at `language_model`, so its decoder layers are reachable as
`language_model.model.layers[i].mlp` for the router to replace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from medplib.core.errors import InvalidInputError
from medplib.core.expert_heads import attach_head, build_expert_heads, trigger_experts
from medplib.core.expert_spec import LossWeights
from medplib.core.model.configuration_medplib import MedPLIBConfig
from medplib.core.model.generation import GenerationOutput, decode
from medplib.core.model.kv_cache import StaticKVCache, direct_call, run_trunk
from medplib.core.model.losses import (
    answer_cross_entropy,
    supervised_positions,
    targeted_mask_logits,
    weighted_loss,
)
from medplib.core.model.pretrained import COMPONENTS, MedPLIBPreTrainedModel
from medplib.core.model.region_encoder import RegionEncoder
from medplib.core.model.request_states import grounding_head, read_requests, request_columns
from medplib.core.model.vision import MultiModalProjector, build_vision_tower, select_image_features


@dataclass(frozen=True)
class MaskPrediction:
    """The masks of one image's `<SEG>` tokens, at the image's original size."""

    logits: torch.Tensor  # (n, H, W), float
    masks: torch.Tensor  # (n, H, W), bool: logits above the threshold
    scores: torch.Tensor  # (n,), SAM's predicted IoU of each mask


@dataclass
class MedPLIBOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    seg_hidden_states: list[torch.Tensor] | None = None  # per sample (n_seg, hidden)
    pred_masks: list[MaskPrediction] | None = None  # per sample, given SAM inputs
    loss_parts: dict[str, torch.Tensor] | None = None  # per part ("ce", "bce", ...), per-sample values
    past_key_values: Any = None  # the cache the pass extended (generation)


class MedPLIBForCausalLM(MedPLIBPreTrainedModel):
    def __init__(self, config: MedPLIBConfig) -> None:
        super().__init__(config)
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision_tower = build_vision_tower(config.vision_config)
        self.projector = MultiModalProjector(
            vision_width,
            text_width,
            norm=config.visual_token_norm,
            standardize=config.image_feature_standardize,
        )
        self.language_model = LlamaForCausalLM(config.text_config)
        self.region_encoder = RegionEncoder(
            vision_width,
            text_width,
            config.region_max_cells,
            norm=config.visual_token_norm,
            medplib_sampling=config.compat == "medplib",
            location_norm=config.region_location_norm,
            appearance=config.region_appearance,
        )
        # Every expert's head, the grounding expert's `<SEG>` head and SAM included, through its spec.
        self.expert_heads: dict[str, nn.Module] = {}
        for name, head in build_expert_heads(config).items():
            attach_head(self, name, head)
        self.trigger_experts = trigger_experts(config)  # token id -> expert
        self._module_default_init = {id(m) for head in self.expert_heads.values() for m in head.modules()}
        self.tokenizer = None  # set by the builders and by from_pretrained; saved with the weights
        if config.seg_read_build_rows:  # filled by the build (`presets.build_medplib`), then saved
            rows = torch.zeros(config.text_config.vocab_size, text_width)
            self.register_buffer("build_word_rows", rows, persistent=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component and in total (works on the meta device)."""
        counts = {
            name: sum(p.numel() for p in self.get_submodule(path).parameters())
            for name, path in COMPONENTS.items()
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    # ---- inputs -------------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP patch features (B, grid*grid, C_vision) of the configured layer."""
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        return select_image_features(self.vision_tower, pixel_values, self.config.vision_feature_layer)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        region_masks: list[torch.Tensor] | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image tokens and region tokens spliced over their placeholders.

        `region_masks[i]` is (R_i, S, S) on sample i's CLIP input frame (`preprocess_region_mask`), one
        per `<region_feat>` of row i in order. `image_features` (B, grid*grid, C_vision), e.g. from a
        cache, stand in for running the tower on `pixel_values`; with them, the input may also be a
        continuation without `<image>` slots (its prefix, image included, is in the KV cache), whose
        region slots the features still fill. Otherwise every row holds all its `<image>` slots.
        With `config.region_appearance` the region encoder also reads `pixel_values`, features or not.
        """
        embeds = self.get_input_embeddings()(input_ids)
        image_slots = input_ids == self.config.image_token_id
        region_slots = input_ids == self.config.region_token_id
        regions_per_row = region_slots.sum(dim=1).tolist()
        given = [0] * len(input_ids) if region_masks is None else [len(m) for m in region_masks]
        if regions_per_row != given:
            raise InvalidInputError(f"rows have {regions_per_row} region slots but {given} region masks")
        if pixel_values is None and image_features is None:
            if image_slots.any() or region_slots.any():
                raise InvalidInputError("the input has <image> or <region_feat> slots but no pixel_values")
            return embeds
        per_row = image_slots.sum(dim=1)
        continuation = image_features is not None and not image_slots.any()
        if not continuation and (per_row != self.config.num_image_tokens).any():
            raise InvalidInputError(
                f"each row needs {self.config.num_image_tokens} <image> slots, got {per_row.tolist()}"
            )
        features = image_features if image_features is not None else self.image_features(pixel_values)
        if not continuation:
            image_tokens = self.projector(features).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_slots[..., None], image_tokens)
        if not any(given):
            return embeds
        region_tokens = torch.cat(
            [
                self.region_encoder(features[i], masks, None if pixel_values is None else pixel_values[i])
                for i, masks in enumerate(region_masks)
                if len(masks)
            ]
        )
        return embeds.masked_scatter(region_slots[..., None], region_tokens.to(embeds.dtype))

    # ---- forward ------------------------------------------------------------------------------------

    def run_language_model(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | StaticKVCache | None = None,
    ) -> tuple[torch.Tensor, Cache | StaticKVCache | None]:
        """The LLM trunk on embeddings: last hidden states (B, T, hidden) and the cache.

        A `StaticKVCache` (`kv_cache.generation_cache`) runs the lean `run_trunk`; a transformers cache
        or none, transformers' forward.
        """
        if position_ids is None and attention_mask is not None:
            # Left padding must not shift positions: count only real tokens.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if isinstance(cache, StaticKVCache):
            return run_trunk(
                self.language_model.model, inputs_embeds, attention_mask, position_ids, cache
            ), cache
        outputs = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return outputs.last_hidden_state, outputs.cache

    def step_pass(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | StaticKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward(inputs_embeds=..., past_key_values=cache, logits_to_keep=1)` for a decoding step,
        without building its output object (a fifth of a product's time, per token): the last
        position's hidden state (B, hidden) and logits (B, V). `attention_mask` None: no padding."""
        hidden, _ = self.run_language_model(inputs_embeds, attention_mask, position_ids, cache)
        last = hidden[:, -1]
        return last, direct_call(self.language_model.lm_head)(last)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        region_masks: list[torch.Tensor] | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        sam_input_sizes: list[tuple[int, int]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
        labels: torch.Tensor | None = None,
        *,
        mask_targets: list[torch.Tensor | None] | None = None,
        loss_weights: LossWeights | None = None,
        loss_samples: int | None = None,
        image_features: torch.Tensor | None = None,
        sam_image_embeddings: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | StaticKVCache | None = None,
        logits_to_keep: int | Literal["supervised"] | None = 0,
    ) -> MedPLIBOutput:
        """The one pass of the model, for training, scoring and generation alike.

        Teacher-forced: with `labels`, `loss` is the objective trained: per sample the mean CE over
        its answer tokens, plus, for samples with a `mask_targets` entry, the mask losses of its
        `<SEG>`s, weighted by `loss_weights` (default: CE alone), summed and divided by
        `loss_samples` (default: the batch; in training the global batch, see `losses.py`);
        `loss_parts` holds each part's per-sample values. With SAM inputs and sizes every `<SEG>` in
        `input_ids` gets a mask (given `mask_targets`, only when some sample has a target).

        Cached encoders: `image_features` (CLIP, as `embed_inputs` takes them) and
        `sam_image_embeddings` stand in for running the frozen towers. Generation: `inputs_embeds`
        instead of `input_ids`, `position_ids`, and `past_key_values` (a `StaticKVCache` or a
        transformers cache) that the new columns extend; `attention_mask` then covers the cached
        columns too. `logits_to_keep`: 0 every position, k the last k, "supervised" only the positions
        that predict a label (N, V) in `supervised_positions` order, None none.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, region_masks, image_features)
        hidden, cache = self.run_language_model(inputs_embeds, attention_mask, position_ids, past_key_values)
        lm_head = self.language_model.lm_head
        supervised = None
        if labels is not None:
            rows, positions, targets = supervised_positions(labels)
            supervised = lm_head(hidden[rows, positions])
        if logits_to_keep is None:
            logits = None
        elif logits_to_keep == "supervised":
            if supervised is None:
                raise InvalidInputError('logits_to_keep="supervised" needs labels')
            logits = supervised
        elif logits_to_keep == 1:
            logits = lm_head(hidden[:, -1])[:, None]  # (B, 1, V) by one (B, hidden) product
        else:
            logits = lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        # `<SEG>` hidden states come from the tokens in view: none for a continuation of a cache.
        seg_hidden = None
        if input_ids is not None and past_key_values is None:
            seg_hidden = self.seg_hidden_states(input_ids, hidden, attention_mask)
        pred_masks = None
        wants_masks = mask_targets is None or any(t is not None for t in mask_targets)
        if (
            seg_hidden is not None
            and wants_masks
            and (sam_pixel_values is not None or sam_image_embeddings is not None)
        ):
            if sam_input_sizes is None or original_sizes is None:
                raise InvalidInputError("SAM inputs need sam_input_sizes and original_sizes")
            pred_masks = self.predict_masks(
                seg_hidden,
                sam_pixel_values,
                sam_input_sizes,
                original_sizes,
                image_embeddings=sam_image_embeddings,
            )
        loss = loss_parts = None
        if supervised is not None:
            ce = answer_cross_entropy(supervised, targets, rows, len(hidden))
            targets_per_row = mask_targets if mask_targets is not None else [None] * len(hidden)
            mask_logits = targeted_mask_logits(pred_masks, targets_per_row)
            summed, loss_parts = weighted_loss(
                ce, mask_logits, targets_per_row, loss_weights or LossWeights()
            )
            loss = summed / (loss_samples or len(hidden))
        return MedPLIBOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=hidden,
            seg_hidden_states=seg_hidden,
            pred_masks=pred_masks,
            loss_parts=loss_parts,
            past_key_values=cache,
        )

    def seg_hidden_states(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per row, the hidden states at the positions that predict a `<SEG>` (the one before each), as
        the grounding head takes them (having read the request, with `seg_read_request`)."""
        is_seg = input_ids[:, 1:] == self.config.seg_token_id
        if attention_mask is not None:
            is_seg &= attention_mask[:, 1:].bool()
        states = [row_hidden[:-1][row_is_seg] for row_hidden, row_is_seg in zip(hidden, is_seg, strict=True)]
        if grounding_head(self) is None:
            return states
        columns = [torch.nonzero(row_is_seg).flatten() for row_is_seg in is_seg]
        request = request_columns(input_ids, attention_mask, self.config.im_end_token_id)
        return read_requests(self, states, columns, hidden, request, input_ids)

    # ---- grounding ----------------------------------------------------------------------------------

    def sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM's image embeddings (B, C, g, g) of preprocessed images (`preprocess_sam_image`)."""
        return self.sam.image_encoder(sam_pixel_values.to(self.sam.mask_decoder.iou_token.weight.dtype))

    def predict_masks(
        self,
        seg_hidden_states: list[torch.Tensor],
        sam_pixel_values: torch.Tensor | None,
        sam_input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        *,
        image_embeddings: torch.Tensor | None = None,
    ) -> list[MaskPrediction]:
        """One mask per `<SEG>` hidden state, at each image's original size.

        SAM's image encoder runs only on the rows that have a `<SEG>`, and not at all when
        `image_embeddings` (B, C, g, g; e.g. from a cache) are given instead of `sam_pixel_values`.
        """
        sam_dtype = self.sam.mask_decoder.iou_token.weight.dtype
        rows = [i for i, states in enumerate(seg_hidden_states) if len(states)]
        embeddings = {}
        if rows:
            if image_embeddings is None:
                if sam_pixel_values is None:
                    raise InvalidInputError("predicting masks needs sam_pixel_values or image_embeddings")
                encoded = self.sam_image_embeddings(sam_pixel_values[rows])
            else:
                encoded = image_embeddings[rows].to(sam_dtype)
            embeddings = dict(zip(rows, encoded, strict=True))
        predictions = []
        for i, states in enumerate(seg_hidden_states):
            height, width = original_sizes[i]
            if i not in embeddings:
                empty = torch.zeros(0, height, width, device=states.device)
                none = MaskPrediction(logits=empty, masks=empty.bool(), scores=empty.new_zeros(0))
                predictions.append(none)
                continue
            prompts = self.seg_head(states).to(sam_dtype)
            dense = self.seg_head.dense_prompts(prompts, self.sam.prompt_encoder, embeddings[i][None])
            low_res, scores = self.sam.decode(embeddings[i][None], prompts, dense)
            logits = self.sam.postprocess(low_res, tuple(sam_input_sizes[i]), (height, width))
            masks = logits > self.config.sam_config.mask_threshold
            predictions.append(MaskPrediction(logits=logits, masks=masks, scores=scores))
        return predictions

    # ---- generation ---------------------------------------------------------------------------------

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> GenerationOutput:
        """Greedy or sampled decoding with the KV cache; see `generation.decode` for the arguments."""
        return decode(self, input_ids, attention_mask, **kwargs)


AutoConfig.register(MedPLIBConfig.model_type, MedPLIBConfig, exist_ok=True)
AutoModel.register(MedPLIBConfig, MedPLIBForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MedPLIBConfig, MedPLIBForCausalLM, exist_ok=True)
