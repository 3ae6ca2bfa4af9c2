"""The serve config and the application plan, without a cluster: YAML, overrides, resources, experts."""

from __future__ import annotations

from pathlib import Path

import pytest

from medplib.agents.serve.app import (
    build_app,
    check_model_source,
    check_resources,
    deployment_plan,
    expert_catalog,
)
from medplib.agents.serve.config import API_KEY_ENV, ServeConfig
from medplib.core.errors import CapacityError, CheckpointError, InvalidInputError, PluginError

EXAMPLES = Path(__file__).parents[3] / "examples" / "serve"


def test_both_examples_load_and_differ_where_the_hardware_does() -> None:
    cpu = ServeConfig.from_yaml(EXAMPLES / "cpu.yaml")
    gpu = ServeConfig.from_yaml(EXAMPLES / "gpu-cluster.yaml")
    assert cpu.http.host == "127.0.0.1" and cpu.deployments.trunk.resources.num_gpus == 0
    assert (
        gpu.deployments.trunk.resources.num_gpus == 1 and gpu.deployments.grounding.resources.num_gpus == 0.25
    )
    assert gpu.deployments.trunk.autoscaling_config["max_replicas"] == 4
    options = gpu.deployments.trunk.serve_options("Trunk", deployment_plan(gpu)["Trunk"][1])
    assert "num_replicas" not in options and options["ray_actor_options"]["memory"] == 48 * 2**30


def test_defaults_are_one_machine_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServeConfig()
    assert (config.http.host, config.http.port, config.model) == ("127.0.0.1", 8000, "tiny")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert config.resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert config.resolved_api_key() == "from-env"
    assert config.with_overrides(api_key="given").resolved_api_key() == "given"
    assert "given" not in repr(config.with_overrides(api_key="given"))


def test_overrides_merge_at_any_depth() -> None:
    base = ServeConfig.from_yaml(EXAMPLES / "cpu.yaml")
    changed = base.with_overrides(model="small", deployments={"trunk": {"batching": {"max_batch_size": 2}}})
    assert changed.model == "small" and changed.deployments.trunk.batching.max_batch_size == 2
    assert changed.deployments.trunk.torch_threads == base.deployments.trunk.torch_threads
    assert changed.deployments.grounding == base.deployments.grounding


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"deployments": {"trunk": {"num_replicas": 0}}}, "deployments.trunk.num_replicas"),
        ({"deployments": {"trunk": {"num_replicas": 2, "autoscaling_config": {}}}}, "not both"),
        (
            {"deployments": {"trunk": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}},
            "max_replicas",
        ),
        ({"deployments": {"grounding": {"resources": {"num_gpus": -1}}}}, "num_gpus"),
        ({"limits": {"max_body_bytes": 10}}, "max_body_bytes"),
        ({"load": {"quantization": "int3"}}, "load.quantization"),
        ({"http": {"host": "0.0.0.0", "prot": 1}}, "http.prot"),
        ({"limits": {"allowed_uri_prefixes": ["zip://a::s3://b/c.zip"]}}, "allowed_uri_prefixes.*chained"),
        ([1, 2], "mapping"),
    ],
)
def test_a_bad_config_names_the_field(data: object, names: str) -> None:
    with pytest.raises(InvalidInputError, match=names):
        ServeConfig.parse(data)


def test_the_load_options_take_a_quantization(tmp_path: Path) -> None:
    (tmp_path / "int8.yaml").write_text("model: tiny\nload:\n  quantization: int8\n")
    config = ServeConfig.from_yaml(tmp_path / "int8.yaml")
    assert config.load.quantization == "int8" and ServeConfig().load.quantization is None
    assert config.load.model_dump()["quantization"] == "int8"  # what the trunk replica loads with


def test_unreadable_yaml_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("deployments: [unclosed")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        ServeConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(InvalidInputError, match="cannot read"):
        ServeConfig.from_yaml(tmp_path / "missing.yaml")


def test_a_replica_no_node_could_hold_is_refused_before_deploying() -> None:
    gpu = ServeConfig.from_yaml(EXAMPLES / "gpu-cluster.yaml")
    with pytest.raises(CapacityError, match="Trunk asks for 1 GPU per replica but the Ray cluster has 0"):
        check_resources(gpu, {"CPU": 16.0})
    check_resources(gpu, {"CPU": 16.0, "GPU": 4.0})
    check_resources(ServeConfig(), {"CPU": 2.0})


def test_a_missing_checkpoint_fails_before_deploying(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a preset"):
        check_model_source(ServeConfig(model=str(tmp_path / "nope")))
    check_model_source(ServeConfig(model=str(tmp_path)))


def test_plugin_experts_become_deployments_on_their_specs_resources(modality_checkpoint: Path) -> None:
    from medplib.core.plugins import get_experts

    spec = get_experts()["modality"]
    config = ServeConfig(model=str(modality_checkpoint), plugin_experts={"modality": {}})
    plan = deployment_plan(config)
    assert set(plan) == {"Ingress", "Trunk", "GroundingDecoder", "Expert-modality"}
    catalog = expert_catalog(config, plan, {"modality": spec})
    assert catalog.deployments["Expert-modality"].resources == spec.resources
    assert {e.spec.name: e.deployments for e in catalog.experts} == {
        "vision_language": ["Trunk"],
        "pixel_grounding": ["Trunk", "GroundingDecoder"],
        "modality": ["Trunk", "Expert-modality"],  # its adapter and token in the trunk, its head apart
    }
    modality = next(e for e in catalog.experts if e.spec.name == "modality")
    assert set(modality.output_schema["properties"]) == {"modality", "probability", "probabilities"}
    assert catalog.capabilities()["modality_classification"] == "modality"
    with pytest.raises(InvalidInputError, match="unknown capability 'laterality'; this server has: "):
        catalog.check_capability("laterality")
    hosted_in_trunk = ServeConfig(model=str(modality_checkpoint))
    catalog = expert_catalog(hosted_in_trunk, deployment_plan(hosted_in_trunk), {})
    assert {e.spec.name: e.deployments for e in catalog.experts}["modality"] == ["Trunk"]
    overridden = config.with_overrides(plugin_experts={"modality": {"resources": {"num_gpus": 0}}})
    assert deployment_plan(overridden)["Expert-modality"][0].resources.num_gpus == 0
    assert build_app(config) is not None  # the graph binds without a cluster
    with pytest.raises(PluginError, match="not installed"):
        deployment_plan(ServeConfig(plugin_experts={"nope": {}}))
    with pytest.raises(PluginError, match="built in"):
        deployment_plan(ServeConfig(model=str(modality_checkpoint), plugin_experts={"pixel_grounding": {}}))
    # A model that does not hold the expert has no trained head for it: refused before deploying.
    with pytest.raises(PluginError, match=r"'modality' is not in the model tiny .* no trained head"):
        deployment_plan(ServeConfig(plugin_experts={"modality": {}}))


def test_a_server_bound_beyond_loopback_is_told_what_is_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ServeConfig().exposure_warnings() == []  # loopback: only this machine can ask
    exposed = ServeConfig().with_overrides(http={"host": "0.0.0.0"})
    no_key, any_file = exposed.exposure_warnings()
    assert "no API key" in no_key and "allowed_uri_prefixes" in any_file
    closed = exposed.with_overrides(api_key="k", limits={"allowed_uri_prefixes": ["s3://scans"]})
    assert closed.exposure_warnings() == []
