"""Routing statistics: shares per layer that sum to 1, text and image tokens apart, and a PNG plot."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from medplib.router import RouterConfig, RoutingStatistics, compose


@pytest.mark.parametrize("top_k", [1, 2])
def test_shares_per_layer_sum_to_one_and_split_text_from_image(trunk, experts, input_ids, top_k) -> None:
    specs, adapters = experts(trunk, 3)
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(top_k=top_k, router_init_std=1.0))
    image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    image_mask[:, 1:5] = True
    with torch.no_grad(), moe.track(image_mask) as statistics:
        moe.model(input_ids)
        moe.model(input_ids)
    summary = statistics.as_dict()
    assert summary["experts"] == ["expert_0", "expert_1", "expert_2"] and set(summary["layers"]) == {"0", "1"}
    for layer in (0, 1):
        shares = statistics.shares(layer)
        for kind in ("all", "text", "image"):
            assert sum(shares[kind]) == pytest.approx(1.0)
        counts = summary["layers"][str(layer)]["assignments"]
        assert counts == {"text": 2 * 10 * top_k, "image": 2 * 8 * top_k}  # two forwards
        chosen = moe.layers[layer].last_routing.experts[image_mask.reshape(-1)]
        expected_image = torch.bincount(chosen.reshape(-1), minlength=3) / chosen.numel()
        assert shares["image"] == pytest.approx(expected_image.tolist())
    assert all(not mlp._forward_hooks for mlp in moe.layers.values())  # tracking ends with the block


def test_image_tokens_from_the_models_own_image_token_id(trunk, experts, input_ids) -> None:
    specs, adapters = experts(trunk, 2)
    moe = compose(copy.deepcopy(trunk), specs, adapters)
    moe.model.config.image_token_id = int(input_ids[0, 0])
    with torch.no_grad(), moe.track(input_ids=input_ids) as statistics:
        moe.model(input_ids)
        moe.model(input_ids[:, :1])  # a later generation step: its tokens are text
    images = int((input_ids == input_ids[0, 0]).sum())
    assert statistics.as_dict()["layers"]["0"]["assignments"] == {
        "text": input_ids.numel() - images + 2,
        "image": images,
    }
    with torch.no_grad(), moe.track(input_ids=input_ids, statistics=statistics) as same:  # accumulate
        moe.model(input_ids)
    assert same is statistics and statistics.as_dict()["layers"]["0"]["assignments"]["image"] == 2 * images


def test_plot_writes_a_png(tmp_path) -> None:
    statistics = RoutingStatistics(["vision_language", "pixel_grounding", "modality"])
    for layer in range(4):
        experts = torch.tensor([[0], [1], [2], [layer % 3]] * 5)
        statistics.update(layer, experts, torch.arange(20) % 2 == 0)
    path = statistics.plot(tmp_path / "routing.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > 4 * 32
        assert len(image.getcolors(maxcolors=100_000)) > 3  # bars in several colours, not a blank canvas
    assert statistics.shares(0)["image"] == [0.5, 0.0, 0.5] and statistics.shares(0)["text"] == [
        0.5,
        0.5,
        0.0,
    ]
    empty = RoutingStatistics(["a", "b"])
    empty.update(0, torch.tensor([[1]]))
    assert empty.shares(0) == {"all": [0.0, 1.0], "text": [0.0, 1.0], "image": [0.0, 0.0]}
