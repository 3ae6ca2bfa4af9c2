"""A composed model saves and loads like any other, and records the experts it was composed from."""

from __future__ import annotations

import copy
import json
import uuid

import fsspec
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from medplib.core.errors import CheckpointError
from medplib.core.expert_spec import ExpertSpec
from medplib.core.hookspecs import hookimpl
from medplib.router import MixtureOfExperts, RouterConfig, compose


class SpecsPlugin:
    def __init__(self, *specs: ExpertSpec) -> None:
        self.specs = specs

    @hookimpl
    def medplib_register_experts(self, register) -> None:
        for spec in self.specs:
            register(spec)


@pytest.fixture
def composed(trunk, experts, register_plugin):
    """A top-2 mixture of three registered experts (the third from its own plugin), and that plugin."""
    specs, adapters = experts(trunk, 3)
    register_plugin(SpecsPlugin(*specs[:2]), "test_experts")
    third = SpecsPlugin(specs[2])
    register_plugin(third, "test_expert_2")
    config = RouterConfig(top_k=2, router_init_std=1.0, load_balancing_weight=0.01)
    return compose(copy.deepcopy(trunk), [spec.name for spec in specs], adapters, config), third


def outputs(moe: MixtureOfExperts, input_ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = [moe.model(input_ids).logits]
        for name in moe.expert_names:
            with moe.force_expert(name):
                logits.append(moe.model(input_ids).logits)
    return logits


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_round_trip_gives_identical_outputs(composed, input_ids, tmp_path, where) -> None:
    moe, _ = composed
    location = tmp_path / "moe" if where == "folder" else f"memory://medplib-tests/{uuid.uuid4().hex}"
    moe.save_pretrained(location)
    loaded = MixtureOfExperts.from_pretrained(location)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.experts == moe.experts and loaded.config == moe.config
    assert [spec.source for spec in loaded.experts] == ["runtime"] * 3
    for got, expected in zip(outputs(loaded, input_ids), outputs(moe, input_ids), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if where == "memory":
        fsspec.filesystem("memory").rm(str(location).removeprefix("memory://"), recursive=True)


def test_the_trunk_files_stay_a_plain_checkpoint_and_the_record_names_the_experts(composed, tmp_path) -> None:
    moe, _ = composed
    moe.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "moe.safetensors"), framework="pt") as handle:
        record = json.loads(handle.metadata()["medplib_moe"])
        keys = set(handle.keys())
    assert [(e["name"], e["version"], e["source"]) for e in record["experts"]] == [
        ("expert_0", "1.0", "runtime"),
        ("expert_1", "1.1", "runtime"),
        ("expert_2", "1.2", "runtime"),
    ]
    assert record["router"]["top_k"] == 2 and keys == set(moe.routed_state_dict())
    trunk = LlamaForCausalLM.from_pretrained(tmp_path)  # no routed keys in the trunk's own weights
    assert type(trunk.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_loading_without_an_expert_fails_naming_it(composed, tmp_path) -> None:
    from medplib.core import plugins

    moe, third = composed
    moe.save_pretrained(tmp_path)
    plugins.pm.unregister(third)
    with pytest.raises(CheckpointError, match=r"not registered here: expert_2 1\.2 \(from runtime\)") as info:
        MixtureOfExperts.from_pretrained(tmp_path)
    assert "expert_0" not in str(info.value).split("not registered here")[1]


def test_a_changed_expert_version_warns(composed, tmp_path, register_plugin) -> None:
    from medplib.core import plugins

    moe, third = composed
    moe.save_pretrained(tmp_path)
    plugins.pm.unregister(third)
    register_plugin(SpecsPlugin(third.specs[0].model_copy(update={"version": "2.0"})), "test_expert_2_new")
    with pytest.warns(UserWarning, match="'expert_2' was composed at version 1.2, registered now at 2.0"):
        MixtureOfExperts.from_pretrained(tmp_path, model_class=LlamaForCausalLM)


def test_bad_checkpoints_are_refused(composed, trunk, tmp_path) -> None:
    moe, _ = composed
    trunk.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"no moe\.safetensors"):
        MixtureOfExperts.from_pretrained(tmp_path / "plain")
    state = moe.routed_state_dict()
    key = next(iter(state))
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {key}"):
        moe.load_routed_state_dict({k: v for k, v in state.items() if k != key})
