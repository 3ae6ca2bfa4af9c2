"""Routing: the gate's choice routes, only chosen deltas run, capacity in training, losses, bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from medplib.core.errors import CheckpointError, InvalidInputError, PluginError
from medplib.router import RouterConfig, compose, route


def count_rows(moe) -> dict[tuple[int, int], list[tuple[int, list[str]]]]:
    """Per (layer, expert): each call of the expert's LoRA, as (rows, projections), via forward hooks."""
    calls: dict[tuple[int, int], list[tuple[int, list[str]]]] = {}
    for layer, mlp in moe.layers.items():
        for e, expert in enumerate(mlp.experts):
            seen = calls.setdefault((layer, e), [])
            expert.register_forward_hook(
                lambda _m, args, _out, seen=seen: seen.append((len(args[0]), sorted(args[1])))
            )
    return calls


def test_tokens_pick_different_experts_and_only_their_deltas_run(trunk, experts, input_ids) -> None:
    specs, adapters = experts(trunk, 3)
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(router_init_std=1.0))
    rows = count_rows(moe)
    with torch.no_grad():
        moe.model(input_ids)
    for layer, mlp in moe.layers.items():
        chosen = mlp.last_routing.experts[:, 0]
        assert len(chosen.unique()) > 1, f"layer {layer}: every token chose the same expert"
        for e in range(3):
            routed = int((chosen == e).sum())
            # gate/up, then down, each on exactly this expert's tokens; no call when it has none
            expected = [(routed, ["gate_proj", "up_proj"]), (routed, ["down_proj"])] if routed else []
            assert rows[layer, e] == expected
        assert sum(int((chosen == e).sum()) for e in range(3)) == input_ids.numel()


def test_route_weights_and_capacity_policy() -> None:
    logits = torch.tensor([[2.0, 0.5, 0.0]] * 6 + [[1.0, 3.0, 0.0]] * 2)
    top1 = route(logits, 1)
    torch.testing.assert_close(top1.weights[:, 0], logits.softmax(-1).max(-1).values)
    assert top1.kept is None
    capped = route(logits, 1, capacity=4)  # 6 tokens want expert 0: the first 4 (token order) keep its delta
    assert capped.kept[:, 0].tolist() == [True] * 4 + [False] * 2 + [True] * 2
    top2 = route(logits, 2, capacity=4)
    torch.testing.assert_close(top2.weights.sum(-1), torch.ones(8))
    # every first choice is served before any second choice, then second choices in token order
    assert top2.kept[:, 0].tolist() == [True] * 4 + [False] * 2 + [True] * 2
    assert top2.kept[:, 1].tolist() == [True] * 2 + [False] * 6


def test_capacity_applies_in_training_only_and_dropped_tokens_keep_the_shared_mlp(trunk, experts) -> None:
    specs, adapters = experts(trunk, 2)
    moe = compose(
        copy.deepcopy(trunk),
        specs,
        adapters,
        RouterConfig(capacity_factor=0.5, min_capacity=0),
    )
    mlp = moe.layers[0]
    mlp.experts[0].dropout.p = 0.0  # training mode, but deterministic
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mlp.train()
        out = mlp(x)
        routing = mlp.last_routing
        assert mlp.capacity(20) == 5
        for e in range(2):
            assert int(((routing.experts[:, 0] == e) & routing.kept[:, 0]).sum()) <= 5
        dropped = ~routing.kept[:, 0]
        assert dropped.any()
        shared = trunk.model.layers[0].mlp(x[dropped]) * routing.weights[dropped]
        torch.testing.assert_close(out[dropped], shared)
        mlp.eval()
        mlp(x)
        assert mlp.capacity(20) is None and mlp.last_routing.kept is None


def test_load_balancing_loss_and_training_gradients(trunk, experts, input_ids) -> None:
    specs, adapters = experts(trunk, 4)
    model = copy.deepcopy(trunk).train()
    moe = compose(model, specs, adapters, RouterConfig(top_k=2))
    assert moe.config.load_balancing_weight == 0
    with pytest.raises(InvalidInputError, match="no forward"):
        moe.router_logits()
    out = model(input_ids, labels=input_ids)
    logits = moe.router_logits()
    assert set(logits) == {0, 1} and logits[0].shape == (input_ids.numel(), 4)
    assert moe.load_balancing_loss().item() == 0.0
    auxiliary = moe.load_balancing_loss(weight=1.0)
    assert torch.isfinite(auxiliary) and auxiliary.item() >= 0.99  # 1 when perfectly balanced
    (out.loss + auxiliary).backward()
    mlp = moe.layers[1]
    assert mlp.router.weight.grad is not None and mlp.router.weight.grad.abs().sum() > 0
    assert mlp.experts[0].lora_B["down_proj"].weight.grad.abs().sum() > 0


def test_an_unscaled_top1_gate_passes_the_expert_at_one_and_still_trains_the_router(
    trunk, experts, input_ids
) -> None:
    logits = torch.tensor([[2.0, 0.5, 0.0], [1.0, 3.0, 0.0]], requires_grad=True)
    weights = route(logits, 1, output="unscaled").weights
    assert weights[:, 0].tolist() == [1.0, 1.0]
    weights.sum().backward()  # p / stop_gradient(p): d/dlogits of 1/p * p, non-zero where p < 1
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # The composed model then equals its chosen experts: forcing the routed choice changes nothing.
    specs, adapters = experts(trunk, 3)
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(top1_output="unscaled"))
    with torch.no_grad():
        routed = moe.model(input_ids).logits
    layer = next(iter(moe.layers.values()))
    assert layer.last_routing.weights.eq(1.0).all()
    scaled = compose(copy.deepcopy(trunk), specs, adapters)
    with torch.no_grad():
        assert not torch.allclose(scaled.model(input_ids).logits, routed)


def test_a_supervised_top1_gate_passes_the_expert_at_one_and_takes_no_gradient_from_the_output(
    trunk, experts, input_ids
) -> None:
    logits = torch.tensor([[2.0, 0.5, 0.0], [1.0, 3.0, 0.0]], requires_grad=True)
    routing = route(logits, 1, output="supervised")
    assert routing.weights[:, 0].tolist() == [1.0, 1.0] and routing.experts[:, 0].tolist() == [0, 1]
    assert not routing.weights.requires_grad  # the outputs give the gate nothing to learn from
    specs, adapters = experts(trunk, 3)
    moe = compose(copy.deepcopy(trunk), specs, adapters, RouterConfig(top1_output="supervised"))
    moe.model(input_ids).logits.sum().backward()
    layer = next(iter(moe.layers.values()))
    assert layer.router.weight.grad is None or not layer.router.weight.grad.any()
    assert layer.experts[0].lora_B["down_proj"].weight.grad is not None  # the experts still learn
    # A loss on the gate's logits (stage IV's routing loss) does train it.
    moe.model.zero_grad()
    moe.model(input_ids)
    targets = torch.zeros(input_ids.numel(), dtype=torch.long)
    torch.nn.functional.cross_entropy(layer.last_routing.logits, targets).backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_composition_defaults_and_partial_layers(trunk, experts) -> None:
    specs, adapters = experts(trunk, 3)
    model = copy.deepcopy(trunk)
    moe = compose(model, specs, None, RouterConfig(layers=(1,)))  # all-layer adapters would not fit
    assert list(moe.layers) == [1] and model.model.layers[1].mlp is moe.layers[1]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert not moe.layers[1].training  # an eval-mode model stays in eval mode
    with pytest.raises(InvalidInputError, match="already routed"):
        compose(model, specs, adapters)
    with pytest.raises(InvalidInputError, match="no expert 'nope'"), moe.force_expert("nope"):
        pass


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("one expert", InvalidInputError, "at least two distinct experts"),
        ("same expert twice", InvalidInputError, "at least two distinct experts"),
        ("top_k above K", InvalidInputError, "top_k <= 2"),
        ("adapters missing", InvalidInputError, "2 experts need 2 adapters"),
        ("unknown layer", InvalidInputError, r"no decoder layers \[7\]"),
        (
            "expert outside routed layers",
            InvalidInputError,
            r"'expert_2' adapts unrouted decoder layers \[1\]",
        ),
        ("adapter on unrouted layers", CheckpointError, "does not route: .*1, 'down_proj'"),
        ("unregistered name", PluginError, "not registered: no_such_expert"),
        ("attention LoRA", CheckpointError, "only LoRA A/B pairs on the MLP"),
        ("wrong rank", CheckpointError, r"shape \(3, 32\), expected \(4, 32\)"),
        ("adapter of another expert", CheckpointError, "has no LoRA on layer 0 gate_proj"),
        ("undeclared weights", CheckpointError, "weights on layers or projections its spec does not declare"),
    ],
)
def test_bad_compositions_are_refused_and_leave_the_model_alone(trunk, experts, case, error, message) -> None:
    all_specs, all_adapters = experts(trunk, 3)
    specs, adapters, config = all_specs[:2], [dict(a) for a in all_adapters[:2]], RouterConfig()
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    if case == "one expert":
        specs, adapters = specs[:1], adapters[:1]
    elif case == "same expert twice":
        specs = [specs[0], specs[0]]
    elif case == "top_k above K":
        config = RouterConfig(top_k=3)
    elif case == "adapters missing":
        adapters = adapters[:1]
    elif case == "unknown layer":
        config = RouterConfig(layers=(0, 7))
    elif case == "expert outside routed layers":
        specs, config = [specs[0], all_specs[2]], RouterConfig(layers=(0,))
    elif case == "adapter on unrouted layers":
        config = RouterConfig(layers=(0,))
    elif case == "unregistered name":
        specs = [specs[0], "no_such_expert"]
    elif case == "attention LoRA":
        adapters[0]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    elif case == "wrong rank":
        adapters[0][key] = torch.zeros(3, 32)
    elif case == "adapter of another expert":
        adapters[0] = adapters[1]  # expert_1 adapts up_proj only
    elif case == "undeclared weights":
        adapters[1][key] = adapters[0][key]
        adapters[1][key.replace("lora_A", "lora_B")] = adapters[0][key.replace("lora_A", "lora_B")]
    model = copy.deepcopy(trunk)
    with pytest.raises(error, match=message):
        compose(model, specs, adapters, config)
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)


def test_router_config_is_validated() -> None:
    for bad in ({"top_k": 0}, {"capacity_factor": 0}, {"load_balancing_weight": -1}, {"typo": 1}):
        with pytest.raises(ValidationError):
            RouterConfig(**bad)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_equal_a_dense_per_token_reference(top_k: int) -> None:
    """The in-place, sorted computation differentiates like the plain formula, in float64."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from medplib.core.expert_spec import LoraSpec
    from medplib.router import ExpertLoRA, RoutedMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, mlp_bias=True, num_attention_heads=2))
    shapes = {
        t: (getattr(mlp, t).in_features, getattr(mlp, t).out_features) for t in ("gate_proj", "up_proj")
    }
    shapes["down_proj"] = (12, 8)
    experts = [ExpertLoRA(shapes, LoraSpec(r=2, alpha=4)), ExpertLoRA({"up_proj": (8, 12)}, LoraSpec(r=3))]
    for parameter in (p for expert in experts for p in expert.parameters()):
        torch.nn.init.normal_(parameter)
    routed = RoutedMLP(mlp, experts, RouterConfig(top_k=top_k, router_init_std=1.0)).double()
    x, probe = torch.randn(10, 8, dtype=torch.double), torch.randn(10, 8, dtype=torch.double)

    def proj(expert: ExpertLoRA, target: str, inputs: torch.Tensor) -> torch.Tensor:
        out = getattr(routed, target)(inputs)
        if target in expert.lora_A:
            out = out + expert.scaling * expert.lora_B[target](expert.lora_A[target](inputs))
        return out

    def reference() -> torch.Tensor:
        weights, chosen = routed.router(x).softmax(-1).topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True) if top_k > 1 else weights
        rows = []
        for n in range(len(x)):
            expert_outputs = []
            for j in range(top_k):
                expert = experts[int(chosen[n, j])]
                hidden = F.silu(proj(expert, "gate_proj", x[n])) * proj(expert, "up_proj", x[n])
                expert_outputs.append(weights[n, j] * proj(expert, "down_proj", hidden))
            rows.append(sum(expert_outputs))
        return torch.stack(rows)

    grads = []
    for forward in (lambda: routed(x), reference):
        routed.zero_grad()
        (forward() * probe).sum().backward()
        grads.append([p.grad.clone() for p in routed.parameters()])
    for (name, _), got, expected in zip(routed.named_parameters(), *grads, strict=True):
        torch.testing.assert_close(got, expected, msg=name)


def test_padding_takes_no_capacity_and_counts_in_no_loss_or_statistic(trunk, experts) -> None:
    """Two sequences, the second padded: the routing of the real tokens, the capacity, the balancing
    loss and the statistics are what the real tokens alone give, padding or not."""
    from medplib.router.statistics import RoutingStatistics

    specs, _ = experts(trunk, 2)
    config = RouterConfig(capacity_factor=0.5, min_capacity=0, router_init_std=1.0, layers=(0,))
    moe = compose(copy.deepcopy(trunk), specs, None, config)
    mlp = moe.layers[0]
    mlp.train()
    for expert in mlp.experts:
        expert.dropout.p = 0.0
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 4:] = 0  # 6 padding tokens
    real = attention_mask.reshape(-1).bool()
    with torch.no_grad():
        mlp(x.reshape(-1, 32)[real])  # the 14 real tokens alone
        alone, alone_loss = mlp.last_routing, moe.load_balancing_loss(weight=1.0)
        with moe.padding(attention_mask), moe.track(statistics=RoutingStatistics(moe.expert_names)) as stats:
            padded_out = mlp(x)
        padded = mlp.last_routing
        assert mlp.capacity(14) == 4 and padded.kept is not None
        assert torch.equal(padded.kept[real], alone.kept) and not padded.kept[~real].any()
        assert moe.load_balancing_loss(weight=1.0).item() == pytest.approx(alone_loss.item())
        assert stats.counts[0].sum() == 14
        torch.testing.assert_close(padded_out.reshape(-1, 32)[real], mlp(x.reshape(-1, 32)[real]))
    assert mlp.real_tokens is None  # the mask applies inside the block only
