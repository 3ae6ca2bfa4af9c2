"""`MedPLIBConfig.region_appearance`: the region token also reads its pixels, on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.core.assistant import MedPLIB
from medplib.core.errors import RegionError
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.model import (
    ControlToken,
    MedPLIBConfig,
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    build_config,
    build_medplib,
)
from medplib.core.model.region_encoder import RegionEncoder, region_appearance
from medplib.core.regions import BoxPrompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    return build_medplib("tiny", options={"region_appearance": True}).eval()


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    """A real chest CT slice (pydicom's CT_small.dcm, 128 x 128) in canonical RGB."""
    return load_image(dicom_file("CT_small.dcm")).pixels


def test_appearance_is_each_channels_mean_and_spread_weighted_by_coverage() -> None:
    pixels = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4)
    masks = torch.zeros(2, 4, 4)
    masks[0, 1:3, 0:2] = 1
    masks[1, 0, 0], masks[1, 3, 3] = 1.0, 0.25  # a pixel covered a quarter weighs a quarter
    got = region_appearance(pixels, masks)
    for row, mask in enumerate(masks):
        weights = (mask / mask.sum()).flatten()
        values = pixels.flatten(1)
        mean = values @ weights
        std = (((values - mean[:, None]) ** 2) @ weights).sqrt()
        assert torch.allclose(got[row], torch.cat([mean, std]), atol=1e-5)


def test_two_regions_the_patch_features_cannot_tell_apart_get_different_tokens() -> None:
    """The same patch features and the same mask: only the pixels differ (a thin bright or dark band)."""
    features = torch.ones(16, 4)
    mask = torch.zeros(1, 16, 16)
    mask[0, 6:8, 2:14] = 1
    bright, dark = torch.full((3, 16, 16), 1.5), torch.full((3, 16, 16), -0.5)
    plain = RegionEncoder(vision_hidden_size=4, text_hidden_size=8, max_cells=16)
    assert torch.equal(plain(features, mask, bright), plain(features, mask, dark))  # pixels unread
    for location_norm in (False, True):
        encoder = RegionEncoder(4, 8, max_cells=16, appearance=True, location_norm=location_norm)
        assert not torch.allclose(encoder(features, mask, bright), encoder(features, mask, dark))
        with pytest.raises(RegionError, match="pixel_values"):
            encoder(features, mask)


def test_the_option_is_off_by_default_and_refused_under_compat() -> None:
    assert not MedPLIBConfig().region_appearance and not build_config("tiny").region_appearance
    assert build_medplib("tiny").region_encoder.appearance is None
    with pytest.raises(ValueError, match="region_appearance"):
        MedPLIBConfig(region_appearance=True, compat="medplib")


def test_cached_features_with_the_pixels_give_the_towers_own_result(model: MedPLIBForCausalLM, ct) -> None:
    processor = MedPLIBProcessor(model.config, model.tokenizer)
    mask = BoxPrompt(box=(30, 40, 90, 100)).to_mask(128, 128)
    batch = processor([Request(ct, [Turn(["What is in", ControlToken.REGION, "?"])], [mask])])
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"])
        direct = model(**batch).logits
        cached = model(**batch, image_features=features).logits
        with pytest.raises(RegionError, match="pixel_values"):
            model(**{**batch, "pixel_values": None}, image_features=features)
    assert torch.allclose(direct, cached, atol=1e-5)


def test_the_assistant_reads_the_pixels_cold_and_from_its_cache(model: MedPLIBForCausalLM, ct) -> None:
    """The served path (cached CLIP features and prefix) hands the region encoder the pixels too, and
    answers as the model's own generation, cold and from its cache."""
    assistant = MedPLIB(model, name="tiny+appearance")
    box = BoxPrompt(box=(30, 40, 90, 100))
    processor = MedPLIBProcessor(model.config, model.tokenizer)
    batch = processor(
        [Request(ct, [Turn(["What is in", ControlToken.REGION, "?"])], [box.to_mask(128, 128)])]
    )
    keys = ("input_ids", "attention_mask", "pixel_values", "region_masks")
    expected = processor.decode(model.generate(**{k: batch[k] for k in keys}, max_new_tokens=5).sequences)[0]
    answers = [assistant.answer(ct, "What is in {region}?", [box], max_new_tokens=5) for _ in range(2)]
    assert [a.text for a in answers] == [expected, expected] and answers[1].cache.clip == "hit"
