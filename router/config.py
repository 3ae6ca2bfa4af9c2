"""`RouterConfig`: how the learned router composes K expert adapters; saved inside a composed checkpoint."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RouterConfig(BaseModel):
    """Options of the routed MLPs.

    - `top_k`: experts per token. Top-1 scales the chosen expert's output by its gate probability
      (as MedPLIB); top-k > 1 renormalises the k probabilities to sum to 1 (DeepSpeed's top-2 gating).
    - `capacity_factor`: training only (eval never drops). Each expert takes at most
      `max(min_capacity, ceil(capacity_factor * tokens * top_k / K))` token assignments per layer and
      forward, first choices first and then in token order; an assignment over capacity keeps the
      shared MLP and its gate weight but loses that expert's delta. None: no limit.
    - `load_balancing_weight`: weight of the Switch-Transformer auxiliary loss (0, as MedPLIB).
    - `layers`: decoder layers whose MLP is routed; None: all of them (MedPLIB).
    - `top1_output`: top-1's forward scale. "probability" (MedPLIB) multiplies the chosen expert's
      output by its gate probability; "unscaled" passes it at 1.0 and lets the gradient reach the gate
      through the probability (p / stop_gradient(p)), so a composed model starts at its experts instead
      of at about half their MLP output, and routing still learns. "supervised" passes it at 1.0 with
      no gradient to the gate from the outputs: the router learns from a routing loss alone (the tiny
      schedule's stage IV `routing_weight`), which the language loss through p / stop_gradient(p) can
      otherwise outweigh; the gate's logits still reach the load-balancing loss.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    top_k: int = Field(1, ge=1)
    capacity_factor: float | None = Field(None, gt=0)
    min_capacity: int = Field(4, ge=0)
    load_balancing_weight: float = Field(0.0, ge=0)
    layers: tuple[int, ...] | None = None
    router_init_std: float = Field(0.02, gt=0)
    top1_output: Literal["probability", "unscaled", "supervised"] = "probability"
