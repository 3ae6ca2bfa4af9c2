"""SAM-Med2D's adapter branch in SAM's image encoder (MedPLIB's SAM is SAM-Med2D ViT-B at 256 px).

SAM-Med2D keeps SAM's ViT blocks and adds, in each, a second branch beside the MLP that reads the
same normalised input: `x = x + mlp(norm2(x)) + Adapter(norm2(x))`. The adapter is a
squeeze-and-excite channel gate followed by a strided conv / transposed-conv pair with a skip, then a
LayerNorm. Module and parameter names follow SAM-Med2D's checkpoints (`blocks.B.Adapter.norm`,
`.channel.{0,2}`, `.spatial.{0,2}`), so its weights load without renaming.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn


class SamMed2DAdapter(nn.Module):
    """Channel gate, then a spatial branch with a skip, then LayerNorm; (B, H, W, C) in and out."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, dim, bias=False),
            nn.Sigmoid(),
        )
        # Halve the grid, then double it back: the branch mixes each token with its neighbourhood.
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_first = x.permute(0, 3, 1, 2)
        gate = self.channel(channels_first.mean(dim=(2, 3)))
        gated = channels_first * gate[:, :, None, None]
        mixed = channels_first + self.spatial(gated)
        return self.norm(mixed.permute(0, 2, 3, 1))


class AdaptedBlock(Block):
    """segment-anything's ViT block with SAM-Med2D's adapter beside its MLP."""

    Adapter: SamMed2DAdapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (height, width))
        x = shortcut + x
        normed = self.norm2(x)
        return x + self.mlp(normed) + self.Adapter(normed)


def add_adapters(encoder: ImageEncoderViT, hidden_dim: int) -> None:
    """Give every block of `encoder` SAM-Med2D's adapter branch, in place (the blocks keep their weights)."""
    for block in encoder.blocks:
        dim = block.norm1.normalized_shape[0]
        # Same module, one more branch: retyping keeps every submodule and parameter name as it was.
        block.__class__ = AdaptedBlock
        block.Adapter = SamMed2DAdapter(dim, hidden_dim)
