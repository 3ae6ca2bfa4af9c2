"""`--experts lora --rank R`: dense experts as one shared MLP plus a rank-R delta per expert.

Each projection of a routed layer becomes `base = mean over experts of W_e` and, per expert, LoRA
factors `B_e A_e` = the best rank-R approximation of `W_e - base` (truncated SVD), stored under the
names medplib's `RoutedMLP` / `ExpertLoRA` use. The model then holds one MLP per layer plus small
factors instead of K full copies, at the cost of the approximation error, which is measured and
reported (relative Frobenius norm `||W_e - base - B_e A_e|| / ||W_e||`, per projection).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from medplib.core.errors import InvalidInputError

EXPERT_KEY = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def factored_shapes(prefix: str, projection: str, shape: tuple, experts: int, rank: int) -> dict[str, tuple]:
    """The keys and shapes that replace one projection's K dense copies."""
    out_features, in_features = shape
    if rank > min(shape):
        raise InvalidInputError(f"rank {rank} exceeds the rank of a {out_features}x{in_features} projection")
    shapes = {f"{prefix}{projection}.weight": shape}
    for expert in range(experts):
        shapes[f"{prefix}experts.{expert}.lora_A.{projection}.weight"] = (rank, in_features)
        shapes[f"{prefix}experts.{expert}.lora_B.{projection}.weight"] = (out_features, rank)
    return shapes


def factor(
    weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """(K, out, in) expert weights -> base, per expert (A, B), per expert relative error; in float32."""
    weights = weights.float()
    base = weights.mean(dim=0)
    factors, errors = [], []
    for weight in weights:
        delta = weight - base
        left, singular, right = torch.linalg.svd(delta, full_matrices=False)
        b, a = left[:, :rank] * singular[:rank], right[:rank]
        factors.append((a, b))
        errors.append(float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(weight).clamp(min=1e-12)))
    return base, factors, errors


class LayerFactorizer:
    """Plans and produces the factored tensors of each (layer, projection) once, from its K source keys."""

    def __init__(
        self, read: Callable[[str], torch.Tensor], sources: Mapping[str, str], experts: int, rank: int
    ):
        """`read(key)` gives a source tensor; `sources`: each dense expert target -> its source key."""
        self.read, self.sources, self.experts, self.rank = read, sources, experts, rank
        self.planned: set[tuple[str, str]] = set()
        self.cache: dict[str, torch.Tensor] = {}
        self.errors: dict[str, list[float]] = {}  # "<prefix><projection>" -> per expert

    def plan(self, target: str, shape: tuple) -> dict[str, tuple]:
        """Shapes of the factored keys for the projection `target` belongs to; empty once planned."""
        prefix, _, projection = EXPERT_KEY.fullmatch(target).groups()
        if (prefix, projection) in self.planned:
            return {}
        self.planned.add((prefix, projection))
        return factored_shapes(prefix, projection, shape, self.experts, self.rank)

    def produce(self, key: str) -> torch.Tensor:
        """A factored tensor; its projection is factored on first use and each tensor handed out once."""
        if key not in self.cache:
            match = re.fullmatch(
                r"(.*\.mlp\.)(?:experts\.\d+\.lora_[AB]\.)?(gate_proj|up_proj|down_proj)\.weight", key
            )
            prefix, projection = match.groups()
            weights = torch.stack(
                [
                    self.read(self.sources[f"{prefix}experts.{e}.{projection}.weight"])
                    for e in range(self.experts)
                ]
            )
            base, factors, errors = factor(weights, self.rank)
            self.errors[prefix + projection] = errors
            self.cache[f"{prefix}{projection}.weight"] = base
            for expert, (a, b) in enumerate(factors):
                self.cache[f"{prefix}experts.{expert}.lora_A.{projection}.weight"] = a
                self.cache[f"{prefix}experts.{expert}.lora_B.{projection}.weight"] = b
        return self.cache.pop(key)
