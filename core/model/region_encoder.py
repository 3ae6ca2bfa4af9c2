"""The region encoder: one marked region of an image becomes one LLM token, as in MedPLIB.

The region's mask is brought to the CLIP patch grid; every cell the mask touches is a candidate,
at most `max_cells` of them are kept (evenly spaced, so the result is deterministic). At each kept
cell the CLIP features are sampled bilinearly at the centroid of the mask's pixels inside that cell
(a region that clips a cell's corner samples near that corner, not at the cell's centre), the
samples are averaged and a linear adapter maps the mean to the LLM width.

Averaged features say what is in a region but little of where it is: on a left-right symmetric image
(a brain slice) a region and its mirror image pool to almost the same vector. So the token also gets
the region's place in the image, its bounding box and centroid in the CLIP frame, through a second
linear map (`location`), and "which hemisphere holds this region" becomes answerable.

With `location_norm` (`MedPLIBConfig.region_location_norm`, an option no preset sets yet) each part
gets its own LayerNorm before they are added, so the place weighs as much as the content. Without it
the tiny preset's place part had about a tenth of the token's norm: along the direction between left
and right regions the two classes overlapped (55 % by a threshold), and the trunk never learned
"which hemisphere", not even trained on those questions alone (benchmarks/results/pipeline.md,
"Session 8").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medplib.core.errors import RegionError
from medplib.core.model.compat import sample_region_features

LOCATION_FEATURES = 6  # x0, y0, x1, y1 of the bounding box and the centroid's x, y, in [-1, 1]
APPEARANCE_FEATURES = 6  # each of the 3 pixel channels' mean and standard deviation inside the region


class RegionEncoder(nn.Module):
    """`medplib_sampling` (the `compat: medplib` profile): MedPLIB's own rule instead, adapter applied to
    the feature map, sampled at every cell of a region-grid mask, no location features (`compat.py`)."""

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        max_cells: int,
        norm: bool = False,
        medplib_sampling: bool = False,
        location_norm: bool = False,
        appearance: bool = False,
    ) -> None:
        super().__init__()
        self.max_cells = max_cells
        self.medplib_sampling = medplib_sampling
        self.adapter = nn.Linear(vision_hidden_size, text_hidden_size)
        self.location = None if medplib_sampling else nn.Linear(LOCATION_FEATURES, text_hidden_size)
        self.norm = nn.LayerNorm(text_hidden_size) if norm else None  # `MedPLIBConfig.visual_token_norm`
        if appearance and medplib_sampling:
            raise ValueError("region appearance is not part of MedPLIB's own region sampling")
        self.appearance = nn.Linear(APPEARANCE_FEATURES, text_hidden_size) if appearance else None
        self.part_norms = None  # `MedPLIBConfig.region_location_norm`: content, place (and appearance)
        if location_norm and self.location is not None:
            parts = 3 if appearance else 2
            self.part_norms = nn.ModuleList([nn.LayerNorm(text_hidden_size) for _ in range(parts)])

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

    def forward(
        self, patch_features: torch.Tensor, masks: torch.Tensor, pixels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(grid*grid, C) features of one image and (R, S, S) masks -> (R, text_hidden) region tokens.

        `pixels` (3, S, S): the image as the CLIP tower takes it; read only with `appearance`.
        """
        num_patches, channels = patch_features.shape
        grid_size = round(num_patches**0.5)
        if self.medplib_sampling:
            adapted = self.adapter(patch_features).T.reshape(-1, grid_size, grid_size)
            tokens = torch.stack([sample_region_features(adapted, mask, self.max_cells) for mask in masks])
            return tokens if self.norm is None else self.norm(tokens)
        feature_map = patch_features.T.reshape(1, channels, grid_size, grid_size)
        pooled = []
        masks = masks.to(feature_map.dtype)
        for points in self.sample_points(masks, grid_size):
            samples = F.grid_sample(
                feature_map, points.view(1, 1, -1, 2), mode="bilinear", align_corners=False
            )
            pooled.append(samples[0, :, 0].mean(dim=-1))
        parts = [self.adapter(torch.stack(pooled)), self.location(region_location(masks))]
        if self.appearance is not None:
            if pixels is None:
                raise RegionError(
                    "this model describes a region by its pixels too: pass the image's pixel_values"
                )
            parts.append(self.appearance(region_appearance(pixels.to(masks.dtype), masks)))
        if self.part_norms is not None:
            parts = [norm(part) for norm, part in zip(self.part_norms, parts, strict=True)]
        tokens = torch.stack(parts).sum(dim=0)
        return tokens if self.norm is None else self.norm(tokens)


def region_location(masks: torch.Tensor) -> torch.Tensor:
    """(R, S, S) coverage -> (R, 6): bounding box (x0, y0, x1, y1) and centroid (x, y) in [-1, 1]."""
    size = masks.shape[-1]
    axis = (torch.arange(size, device=masks.device, dtype=masks.dtype) * 2 + 1) / size - 1
    total = masks.sum(dim=(1, 2)).clamp(min=1e-6)
    columns, rows = masks.sum(dim=1) > 0, masks.sum(dim=2) > 0  # (R, S): which x / y the mask touches
    features = []
    for touched in (columns, rows):
        inside = axis.expand_as(touched)
        features.append(torch.where(touched, inside, torch.inf).amin(dim=1))
        features.append(torch.where(touched, inside, -torch.inf).amax(dim=1))
    x0, x1, y0, y1 = features
    centroid_x = (masks.sum(dim=1) * axis).sum(dim=1) / total
    centroid_y = (masks.sum(dim=2) * axis).sum(dim=1) / total
    return torch.stack([x0, y0, x1, y1, centroid_x, centroid_y], dim=-1)


def region_appearance(pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(3, S, S) pixels and (R, S, S) coverage -> (R, 6): each channel's mean, then its standard
    deviation, inside each region, weighted by the coverage."""
    weights = masks / masks.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    mean = torch.einsum("rhw,chw->rc", weights, pixels)
    variance = torch.einsum("rhw,rchw->rc", weights, (pixels[None] - mean[..., None, None]) ** 2)
    return torch.cat([mean, variance.clamp(min=0).sqrt()], dim=-1)
