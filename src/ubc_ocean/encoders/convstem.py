"""CTransPath's convolutional patch embedding for timm's Swin transformer (Wang et al., 2022).

Two stride-2 3x3 convolutions (each with batch norm and ReLU) and a 1x1 projection replace Swin's 4x4
patchify; the output is channels-last, as timm's Swin expects from its ``embed_layer``.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """A 4x downsampling convolutional stem producing [B, H/4, W/4, embed_dim]."""

    def __init__(self, img_size: int | tuple = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: type[nn.Module] | None = None, **_: object):
        super().__init__()
        if patch_size not in (4, (4, 4)):
            raise ValueError("ConvStem downsamples by exactly 4 (patch_size=4)")
        # What timm's Swin reads from its patch embedding.
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (4, 4)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
