"""Routing statistics: the share of tokens each expert takes per layer, text and image tokens apart.

Shares count (token, choice) assignments, so with top-k each token counts k times and the shares of a
layer still sum to 1. A forward whose tokens do not match the image mask's shape (the steps of
generation after the prompt) counts as text: those tokens are generated text. The plot is drawn with
Pillow, which medplib already needs, rather than adding matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

KINDS = ("text", "image")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


class RoutingStatistics:
    """Assignment counts per layer: a (2, K) tensor, row 0 text tokens, row 1 image tokens."""

    def __init__(self, expert_names: Sequence[str]) -> None:
        self.expert_names = tuple(expert_names)
        self.counts: dict[int, torch.Tensor] = {}

    def update(
        self,
        layer: int,
        experts: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's choices `experts` (tokens, k) at `layer`; `image_mask` marks image tokens,
        `real` the tokens that are not padding (the others are not counted)."""
        num_experts = len(self.expert_names)
        is_image = torch.zeros(len(experts), dtype=torch.long, device=experts.device)
        if image_mask is not None and image_mask.numel() == len(experts):
            is_image = image_mask.reshape(-1).to(device=experts.device, dtype=torch.long)
        if real is not None:
            experts, is_image = experts[real], is_image[real]
        cells = (is_image[:, None] * num_experts + experts).reshape(-1)
        counts = torch.bincount(cells, minlength=2 * num_experts).reshape(2, num_experts).cpu()
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(counts)) + counts

    def shares(self, layer: int) -> dict[str, list[float]]:
        """Share of assignments per expert at `layer`: all, text and image tokens (zeros where none)."""
        counts = self.counts[layer].double()
        rows = {"all": counts.sum(0), "text": counts[0], "image": counts[1]}
        return {kind: (row / row.sum() if row.sum() else row).tolist() for kind, row in rows.items()}

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: expert names, and per layer the shares and the number of assignments by kind."""
        return {
            "experts": list(self.expert_names),
            "layers": {
                str(layer): {
                    "shares": self.shares(layer),
                    "assignments": dict(zip(KINDS, counts.sum(1).tolist(), strict=True)),
                }
                for layer, counts in sorted(self.counts.items())
            },
        }

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG: per layer, one stacked bar of expert shares for text tokens and one for image tokens."""
        bar, gap, label_width, bar_width, margin = 16, 10, 110, 420, 12
        layers = sorted(self.counts)
        height = margin * 2 + 24 + len(layers) * (2 * bar + gap)
        image = Image.new("RGB", (label_width + bar_width + 2 * margin, height), "white")
        draw = ImageDraw.Draw(image)
        x = margin
        for e, name in enumerate(self.expert_names):  # legend
            draw.rectangle((x, margin, x + 10, margin + 10), fill=PALETTE[e % len(PALETTE)])
            draw.text((x + 14, margin - 1), name, fill="black")
            x += 24 + 7 * len(name)
        y = margin + 24
        for layer in layers:
            shares = self.shares(layer)
            for kind in KINDS:
                draw.text((margin, y + 2), f"layer {layer} {kind}", fill="black")
                left = label_width + margin
                for e, share in enumerate(shares[kind]):
                    right = left + share * bar_width
                    if right > left:
                        draw.rectangle((left, y, right, y + bar - 2), fill=PALETTE[e % len(PALETTE)])
                    left = right
                y += bar
            y += gap
        path = Path(path)
        image.save(path, format="PNG")
        return path
