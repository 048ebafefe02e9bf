"""ResNet image encoder with GroupNorm, swish, coordinate channels and FiLM language conditioning.

Written from scratch (torchvision/timm would pull a CUDA torch build). Follows the V-GPS critic
encoder: ResNet-18/34 basic blocks, GroupNorm, SiLU, two coordinate channels appended to the
normalised image, a FiLM layer after every residual block (zero-initialised, so an untrained
encoder ignores the language), global average pooling to an `8 * width`-d feature (512 at
the standard width 64).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

# Residual blocks per stage. 10 is a tiny variant for tests (one block per stage).
STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """Make a GroupNorm with the largest group count <= max_groups that divides `channels`."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


def add_coordinates(x: torch.Tensor) -> torch.Tensor:
    """Append (y, x) coordinate planes in [-1, 1]: (B, C, H, W) -> (B, C + 2, H, W)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij'))
    return torch.cat([x, grid.expand(b, 2, h, w)], dim=1)


class FiLM(nn.Module):
    """Feature-wise modulation x * (1 + gamma(l)) + beta(l); zero-initialised: identity at init."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Modulate x (B, C, H, W) by cond (B, D) -> (B, C, H, W)."""
        gamma, beta = self.proj(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1.0 + gamma) + beta


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a (projected when the shape changes) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, max_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = group_norm(out_ch, max_groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = group_norm(out_ch, max_groups)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          group_norm(out_ch, max_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.silu(y + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Image (+ language) -> feature (B, 8 * width).

    Args:
        depth: 18 or 34 (10 = one block per stage, for tests).
        width: channels of the stem and first stage; stages use width * (1, 2, 4, 8).
        coord_channels: append two coordinate planes to the normalised image.
        lang_dim: size of the language embedding for FiLM; 0 disables FiLM.
        max_groups: GroupNorm group count (capped to a divisor of each layer's channels).
    """

    def __init__(self, depth: int = 34, width: int = 64, coord_channels: bool = True,
                 lang_dim: int = 384, max_groups: int = 32):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f'ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}')
        self.coord_channels = coord_channels
        self.feature_dim = 8 * width
        # Derived constants, not state: kept out of checkpoints.
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        in_ch = 3 + 2 * coord_channels
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 7, 2, 3, bias=False),
                                  group_norm(width, max_groups), nn.SiLU(), nn.MaxPool2d(3, 2, 1))
        blocks, films = [], []
        channels = width
        for stage, count in enumerate(STAGE_BLOCKS[depth]):
            out_ch = width * 2 ** stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_ch, stride, max_groups))
                films.append(FiLM(lang_dim, out_ch) if lang_dim else nn.Identity())
                channels = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.films = nn.ModuleList(films)
        self.lang_dim = lang_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 in [0, 255] or float in [0, 1] -> normalised (B, 3(+2), H, W)."""
        # Contiguous NCHW: a permuted (channels-last strided) input makes convolutions pick a
        # layout that disagrees with the weights.
        x = images.permute(0, 3, 1, 2).contiguous()
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        return add_coordinates(x) if self.coord_channels else x

    def forward(self, images: torch.Tensor, lang: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode images (B, H, W, 3) with lang (B, lang_dim), None if lang_dim = 0 -> (B, F)."""
        if self.lang_dim and (lang is None or lang.shape != (images.shape[0], self.lang_dim)):
            got = None if lang is None else tuple(lang.shape)
            raise ValueError(f'expected a language embedding ({images.shape[0]}, '
                             f'{self.lang_dim}), got {got}')
        x = self.stem(self.preprocess(images))
        for block, film in zip(self.blocks, self.films):
            x = block(x)
            x = film(x, lang) if self.lang_dim else x
        return x.mean(dim=(2, 3))
