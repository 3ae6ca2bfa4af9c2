"""The example plugin, installed with pip: listed by `medplib experts`, composed into a three-expert MoE."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medplib.core.model import (
    ControlToken,
    MedPLIBForCausalLM,
    MedPLIBProcessor,
    Request,
    Turn,
    build_medplib,
)
from medplib.core.plugins import ENV_VAR, get_experts
from medplib.router import MixtureOfExperts, compose, merge_expert, new_expert_adapter

EXPERTS = ["vision_language", "pixel_grounding", "modality"]


def medplib_experts(*args: str, plugins: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    if plugins is not None:
        env[ENV_VAR] = plugins
    command = [sys.executable, "-m", "medplib.cli", "experts", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=True)


def test_medplib_experts_lists_the_installed_example(example_plugin) -> None:
    payload = json.loads(medplib_experts("--json").stdout)
    sources = {expert["name"]: expert["source"] for expert in payload["experts"]}
    assert sources["modality"] == "medplib-expert-modality 0.1.0"
    assert sources["vision_language"] == sources["pixel_grounding"] == "builtin"
    assert payload["problems"] == []
    table = medplib_experts().stdout.splitlines()
    assert any(
        line.split()[0] == "modality" and line.endswith("medplib-expert-modality 0.1.0") for line in table
    )


@pytest.mark.parametrize(
    ("value", "listed"),
    [("", False), ("modality", True), ("medplib-expert-modality", True), ("something_else", False)],
)
def test_env_var_limits_the_installed_plugins(example_plugin, value: str, listed: bool) -> None:
    names = [
        expert["name"] for expert in json.loads(medplib_experts("--json", plugins=value).stdout)["experts"]
    ]
    assert names[:2] == ["vision_language", "pixel_grounding"]  # built-ins always load
    assert ("modality" in names) == listed


@pytest.fixture
def tiny_medplib() -> MedPLIBForCausalLM:
    torch.manual_seed(0)
    return build_medplib("tiny").eval()


def test_three_expert_moe_runs_a_grounding_forward_and_round_trips(
    example_plugin, tiny_medplib, tmp_path
) -> None:
    specs = [get_experts()[name] for name in EXPERTS]
    adapters = [
        new_expert_adapter(tiny_medplib, spec, init_lora_weights=False, seed=i)
        for i, spec in enumerate(specs)
    ]
    original = copy.deepcopy(tiny_medplib)
    moe = compose(tiny_medplib, EXPERTS, adapters)
    assert len(moe.layers) == tiny_medplib.config.text_config.num_hidden_layers
    processor = MedPLIBProcessor(tiny_medplib.config, tiny_medplib.tokenizer)
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    batch = processor([Request(image, [Turn("Segment the lesion.", ["It is", ControlToken.SEG, "."])])])
    with torch.no_grad(), moe.track(input_ids=batch["input_ids"]) as statistics:
        out = tiny_medplib(**batch)
    assert torch.isfinite(out.logits).all() and out.pred_masks[0].masks.shape == (1, 60, 80)
    assert statistics.as_dict()["layers"]["0"]["assignments"]["image"] == tiny_medplib.config.num_image_tokens
    head = specs[2].build_head(tiny_medplib.config)
    modalities = importlib.import_module("medplib_expert_modality.outputs").MODALITIES
    assert head(out.last_hidden_state[:, -1]).shape == (1, len(modalities))
    question = processor([Request(image, [Turn("What modality is this?")])])
    inputs = {k: question[k] for k in ("input_ids", "attention_mask", "pixel_values", "region_masks")}
    with torch.no_grad(), moe.track(input_ids=question["input_ids"]) as generated:
        tiny_medplib.generate(
            **inputs, max_new_tokens=3
        )  # decoding with the KV cache goes through the router
    assignments = generated.as_dict()["layers"]["0"]["assignments"]
    assert assignments["image"] == tiny_medplib.config.num_image_tokens and assignments["text"] > 0

    reference = copy.deepcopy(original)
    reference.language_model = merge_expert(original, specs[2], adapters[2])
    with torch.no_grad(), moe.force_expert("modality"):
        torch.testing.assert_close(tiny_medplib(**batch).logits, reference(**batch).logits)

    moe.save_pretrained(tmp_path)
    loaded = MixtureOfExperts.from_pretrained(tmp_path)
    assert isinstance(loaded.model, MedPLIBForCausalLM)
    assert [(s.name, s.source) for s in loaded.experts] == [
        ("vision_language", "builtin"),
        ("pixel_grounding", "builtin"),
        ("modality", "medplib-expert-modality 0.1.0"),
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, out.logits, rtol=0, atol=0)
