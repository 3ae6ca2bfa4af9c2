"""The region encoder: one marked region of an image becomes one LLM token, as in MedPLIB.

The region's mask is brought to the CLIP patch grid; every cell the mask touches is a candidate,
at most `max_cells` of them are kept (evenly spaced, so the result is deterministic). At each kept
cell the CLIP features are sampled bilinearly at the centroid of the mask's pixels inside that cell
(a region that clips a cell's corner samples near that corner, not at the cell's centre), the
samples are averaged and a linear adapter maps the mean to the LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.errors import RegionError


class RegionEncoder(nn.Module):
    def __init__(self, vision_hidden_size: int, text_hidden_size: int, max_cells: int) -> None:
        super().__init__()
        self.max_cells = max_cells
        self.adapter = nn.Linear(vision_hidden_size, text_hidden_size)

    def sample_points(self, masks: torch.Tensor, grid_size: int) -> list[torch.Tensor]:
        """Per mask, the sampling points (n, 2) as (x, y) in [-1, 1] (`grid_sample`'s convention).

        `masks` is (R, S, S) coverage in [0, 1] on the CLIP input frame.
        """
        size = masks.shape[-1]
        # Pixel centres in grid_sample's align_corners=False coordinates.
        axis = (torch.arange(size, device=masks.device, dtype=masks.dtype) * 2 + 1) / size - 1
        weights = masks[:, None]
        coverage = F.adaptive_avg_pool2d(weights, grid_size)
        x_sum = F.adaptive_avg_pool2d(weights * axis.view(1, 1, 1, size), grid_size)
        y_sum = F.adaptive_avg_pool2d(weights * axis.view(1, 1, size, 1), grid_size)
        points = []
        for cov, xs, ys in zip(coverage[:, 0], x_sum[:, 0], y_sum[:, 0], strict=True):
            cells = torch.nonzero(cov.flatten() > 0).squeeze(1)
            if cells.numel() == 0:
                raise RegionError("a region mask covers no cell of the image grid")
            if cells.numel() > self.max_cells:
                keep = (
                    torch.linspace(0, cells.numel() - 1, self.max_cells, device=cells.device).round().long()
                )
                cells = cells[keep]
            total = cov.flatten()[cells]
            points.append(torch.stack([xs.flatten()[cells] / total, ys.flatten()[cells] / total], dim=-1))
        return points

    def forward(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(grid*grid, C) features of one image and (R, S, S) masks -> (R, text_hidden) region tokens."""
        num_patches, channels = patch_features.shape
        grid_size = round(num_patches**0.5)
        feature_map = patch_features.T.reshape(1, channels, grid_size, grid_size)
        pooled = []
        for points in self.sample_points(masks.to(feature_map.dtype), grid_size):
            samples = F.grid_sample(
                feature_map, points.view(1, 1, -1, 2), mode="bilinear", align_corners=False
            )
            pooled.append(samples[0, :, 0].mean(dim=-1))
        return self.adapter(torch.stack(pooled))
