"""The learned per-token router and the MoE layer that composes expert adapters.

`compose(model, ["vision_language", "pixel_grounding"], adapters)` routes the MLPs of a model's LLM
over registered experts and returns a `MixtureOfExperts`. Names load on first use, so importing
`medplib.router` does not import torch.
"""

from __future__ import annotations

from medplib.core.lazy import lazy_exports

_EXPORTS = {
    "RouterConfig": "medplib.router.config",
    "Routing": "medplib.router.routed_mlp",
    "RoutedMLP": "medplib.router.routed_mlp",
    "ExpertLoRA": "medplib.router.routed_mlp",
    "route": "medplib.router.routed_mlp",
    "compose": "medplib.router.moe",
    "MixtureOfExperts": "medplib.router.moe",
    "RoutingStatistics": "medplib.router.statistics",
    "attach_expert_adapter": "medplib.router.adapters",
    "lora_config": "medplib.router.adapters",
    "merge_expert": "medplib.router.adapters",
    "new_expert_adapter": "medplib.router.adapters",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("medplib.router", _EXPORTS, globals())
