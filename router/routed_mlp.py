"""`RoutedMLP`: a LLaMA MLP whose K experts are low-rank deltas on one shared set of projections.

Expert e computes `down_e(act(gate_e(x)) * up_e(x))` with `proj_e(x) = W x + s_e B_e A_e x` (peft's
LoRA, `s_e = alpha / r`). A learned gate picks the top-k experts of each token. The shared `W` run once
for all tokens; tokens are sorted by their expert so each expert's `A` and `B` run on one contiguous
slice holding only its tokens, and the cost is one expert's LoRA, whatever K is. Because `down` is
linear, a token's k weighted intermediate activations are summed before its one shared down projection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.expert_spec import LoraSpec
from medplib.router.config import RouterConfig


@dataclass(frozen=True)
class Routing:
    """One layer's routing decision for N tokens and k choices each."""

    logits: torch.Tensor  # (N, K): the gate's logits, kept for losses and statistics
    experts: torch.Tensor  # (N, k): chosen expert per token and choice
    weights: torch.Tensor  # (N, k): output scale per choice
    kept: torch.Tensor | None  # (N, k): False where capacity dropped that delta; None: nothing dropped
    real: torch.Tensor | None = None  # (N,): False at padding, which losses and statistics skip; None: all


def route(
    logits: torch.Tensor,
    top_k: int,
    capacity: int | None = None,
    real: torch.Tensor | None = None,
    output: str = "probability",
) -> Routing:
    """Top-k gating; see `RouterConfig` for the weighting and the capacity policy.

    `real` (N,) marks the tokens that are not padding: only they take capacity (padding keeps the
    shared MLP alone, its output is never used).
    """
    # At least float32: half-precision gate probabilities would round the routing weights.
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights, experts = probs.topk(top_k, dim=-1)
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    elif output == "unscaled":  # 1.0 forward, the probability's gradient backward (`RouterConfig`)
        weights = weights / weights.detach()
    elif output == "supervised":  # 1.0 forward and no gradient: only a routing loss trains the gate
        weights = torch.ones_like(weights)
    kept = None
    if capacity is not None:
        # Choice-major order serves every token's first choice before any second choice.
        one_hot = F.one_hot(experts.T.reshape(-1), logits.shape[-1])
        if real is not None:
            one_hot = one_hot * real.repeat(top_k)[:, None]
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        kept = ((position >= 0) & (position < capacity)).reshape(top_k, -1).T
    return Routing(logits, experts, weights.to(logits.dtype), kept, real)


def forced_routing(logits: torch.Tensor, expert: int) -> Routing:
    """Every token to `expert` with weight 1.0, so the layer equals that expert's merged MLP."""
    column = torch.full((len(logits), 1), expert, dtype=torch.long, device=logits.device)
    ones = torch.ones(column.shape, dtype=logits.dtype, device=logits.device)
    return Routing(logits, column, ones, None)


class ExpertLoRA(nn.Module):
    """One expert's LoRA factors on one MLP, named as peft names them (`lora_A` / `lora_B` per target).

    Initialised as peft does (A Kaiming-uniform, B zero), so a fresh expert starts equal to the trunk.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], spec: LoraSpec) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict(
            {t: nn.Linear(n_in, spec.r, bias=False) for t, (n_in, _) in shapes.items()}
        )
        self.lora_B = nn.ModuleDict(
            {t: nn.Linear(spec.r, n_out, bias=False) for t, (_, n_out) in shapes.items()}
        )
        for linear in self.lora_B.values():
            nn.init.zeros_(linear.weight)
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> None:
        """`outputs[t] += s * B_t A_t dropout(x)` in place, for each target t this expert adapts.

        Targets that read the same `x` (gate and up) share one A product and so one dropout mask.
        """
        targets = [t for t in outputs if t in self.lora_A]
        if not targets:
            return
        weights = [self.lora_A[t].weight for t in targets]
        low_rank = F.linear(self.dropout(x), weights[0] if len(weights) == 1 else torch.cat(weights))
        for part, target in zip(
            low_rank.split(self.lora_A[targets[0]].out_features, dim=1), targets, strict=True
        ):
            outputs[target].addmm_(part, self.lora_B[target].weight.t(), alpha=self.scaling)


class RoutedMLP(nn.Module):
    """Drop-in replacement of a LLaMA MLP: shared projections, K routed LoRA experts, a learned gate.

    The shared projections are the replaced MLP's own modules under their own names, so the trunk's
    state-dict keys do not change. `forced_expert` (set by `MixtureOfExperts.force_expert`) sends every
    token to one expert with weight 1.0 instead of the gate probability.
    """

    def __init__(self, mlp: nn.Module, experts: Sequence[ExpertLoRA], config: RouterConfig) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        weight = self.gate_proj.weight
        self.experts = nn.ModuleList(experts).to(device=weight.device, dtype=weight.dtype)
        self.router = nn.Linear(
            weight.shape[1], len(experts), bias=False, device=weight.device, dtype=weight.dtype
        )
        nn.init.normal_(self.router.weight, std=config.router_init_std)
        self.top_k = config.top_k
        self.top1_output = config.top1_output
        self.capacity_factor = config.capacity_factor
        self.min_capacity = config.min_capacity
        self.forced_expert: int | None = None
        self.real_tokens: torch.Tensor | None = None  # set by `MixtureOfExperts.padding`
        self.last_routing: Routing | None = None

    def capacity(self, num_tokens: int) -> int | None:
        if not self.training or self.capacity_factor is None:
            return None
        fair_share = num_tokens * self.top_k / len(self.experts)
        return max(self.min_capacity, math.ceil(self.capacity_factor * fair_share))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(flat)
        real = self.real_tokens
        if real is not None and real.numel() != len(flat):  # a generation step: its new tokens are real
            real = None
        if self.forced_expert is None:
            num_real = len(flat) if real is None else int(real.sum())
            routing = route(logits, self.top_k, self.capacity(num_real), real, self.top1_output)
        else:
            routing = forced_routing(logits, self.forced_expert)
        self.last_routing = routing
        return self.mix(flat, routing).reshape(hidden_states.shape)

    def mix(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The routed MLP output (N, hidden) of tokens `flat` (N, hidden) under `routing`."""
        num_tokens, top_k = routing.experts.shape
        num_experts = len(self.experts)
        # (token, choice) pairs, choice-major; a dropped pair joins group K: the shared MLP alone.
        groups = routing.experts
        if routing.kept is not None:
            groups = torch.where(routing.kept, groups, num_experts)
        groups = groups.T.reshape(-1)
        order = groups.argsort(stable=True)
        bounds = [0, *itertools.accumulate(torch.bincount(groups, minlength=num_experts + 1).tolist())]
        slices = [
            (e, slice(bounds[e], bounds[e + 1])) for e in range(num_experts) if bounds[e] < bounds[e + 1]
        ]
        rows = order if top_k == 1 else order % num_tokens
        weights = routing.weights.T.reshape(-1)[order, None]
        x = flat[rows]
        if top_k == 1:  # rows is a permutation of the tokens: the shared projections still run once
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_proj(flat)[rows], self.up_proj(flat)[rows]
        for e, part in slices:
            self.experts[e](x[part], {"gate_proj": gate[part], "up_proj": up[part]})
        hidden = self.act_fn(gate) * up
        if top_k == 1:  # down is linear, so scaling its (narrower) output equals scaling its input
            out_rows = self._down(hidden)
            for e, part in slices:
                self.experts[e](hidden[part], {"down_proj": out_rows[part]})
            out = out_rows.new_empty(out_rows.shape).index_copy_(0, rows, out_rows.mul_(weights))
        else:
            hidden = hidden * weights
            summed = hidden.new_zeros(num_tokens, hidden.shape[1]).index_add(0, rows, hidden)
            deltas = hidden.new_zeros(len(rows), self.down_proj.out_features)
            for e, part in slices:
                self.experts[e](hidden[part], {"down_proj": deltas[part]})
            out = self._down(summed).index_add(0, rows, deltas)
        bias = _bias(self.down_proj)
        if bias is not None:
            out = out + routing.weights.sum(dim=-1, keepdim=True) * bias
        return out

    def _down(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared down projection without its bias (added once, scaled by the routing weights);
        through the module itself when it has none, so a quantised projection runs its own kernel."""
        bias = _bias(self.down_proj)
        return self.down_proj(hidden) if bias is None else F.linear(hidden, self.down_proj.weight)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    bias = linear.bias
    return bias() if callable(bias) else bias  # torch's quantised linears expose it as a method
