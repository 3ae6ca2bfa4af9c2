"""The generation fast paths equal transformers' own: truncated CLIP tower, preallocated KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from medplib.core.errors import InvalidInputError
from medplib.core.model import MedPLIBForCausalLM, MedPLIBProcessor, Request, Turn
from medplib.core.model.kv_cache import StaticKVCache, run_trunk, supports_static_cache
from medplib.core.model.vision import select_image_features


@pytest.mark.parametrize("layer", [-2, -1, 0, 2])
def test_image_features_of_a_layer_equal_the_towers_hidden_state(tiny_model, processor, image, layer) -> None:
    pixels = processor([Request(image, [Turn("x")])])["pixel_values"]
    with torch.no_grad():
        expected = tiny_model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        torch.testing.assert_close(select_image_features(tiny_model.vision_tower, pixels, layer), expected)
    with pytest.raises(InvalidInputError, match="vision feature layer"):
        select_image_features(tiny_model.vision_tower, pixels, 9)


def test_the_static_cache_trunk_equals_transformers_forward(
    tiny_model: MedPLIBForCausalLM, processor: MedPLIBProcessor, image
) -> None:
    requests = [
        Request(image, [Turn("What modality is this?")]),
        Request(image, [Turn("Is it normal? Say.")]),
    ]
    batch = processor(requests)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    trunk = tiny_model.language_model.model
    assert supports_static_cache(trunk)
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(ids, batch["pixel_values"])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected, dynamic = tiny_model.run_language_model(
            embeds, mask, cache=DynamicCache(config=trunk.config)
        )
        static = StaticKVCache.empty(trunk, len(ids), ids.shape[1] + 1, embeds)
        hidden = run_trunk(trunk, embeds, mask, positions, static)
        real = mask.bool()
        torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)
        assert static.length == ids.shape[1] and torch.isfinite(hidden).all()
        # One more token for every row, against the cache of each side.
        step = tiny_model.get_input_embeddings()(torch.tensor([[5], [6]]))
        longer = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        next_positions = mask.sum(dim=1, keepdim=True)
        expected_step, _ = tiny_model.run_language_model(step, longer, next_positions, dynamic)
        torch.testing.assert_close(
            run_trunk(trunk, step, longer, next_positions, static), expected_step, atol=1e-5, rtol=1e-5
        )
        with pytest.raises(RuntimeError, match="KV cache holds"):
            run_trunk(trunk, step, torch.cat([longer, longer[:, :1]], dim=1), next_positions + 1, static)
