"""Conditional residual UNet ε̂_θ([x_t ⊕ c], t) (Fig. 2, Section 2.3).

Early fusion: the lung mask c is concatenated channel-wise with x_t at the input (``ModelConfig.conditional``;
the unconditional ablation takes x_t alone). A 2.5D model's x_t holds the slice and its neighbours as channels
(``ModelConfig.context_slices``) and it predicts ε for each of them. ``len(channels) − 1`` downsampling modules
and as many upsampling modules of ``blocks_per_module`` residual blocks each, joined by a bottleneck of
``bottleneck_blocks`` blocks; every residual block receives the sinusoidal timestep embedding. The ``paper`` preset
has 7 + 7 modules of 3 blocks and a 2-block bottleneck, as Fig. 2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + timestep projection, GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        emb_dim = cfg.time_embed_dim or 4 * ch[0]
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, cfg.groups, cfg.dropout)  # noqa: E731
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        levels = len(ch) - 1
        # Down module i: blocks at width ch[i] (its output is kept for the skip), then a stride-2 conv to ch[i+1].
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i in range(levels):
            self.down_blocks.append(nn.ModuleList([block(ch[i], ch[i]) for _ in range(cfg.blocks_per_module)]))
            self.downsample.append(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1))
        self.bottleneck = nn.ModuleList([block(ch[-1], ch[-1]) for _ in range(cfg.bottleneck_blocks)])
        # Up module i (coarse to fine): nearest ×2 + conv to ch[i], concatenate the skip, blocks back to ch[i].
        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            self.upsample.append(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1))
            blocks = [block(2 * ch[i], ch[i])] + [block(ch[i], ch[i]) for _ in range(cfg.blocks_per_module - 1)]
            self.up_blocks.append(nn.ModuleList(blocks))
        self.norm_out = nn.GroupNorm(cfg.groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.image_channels, 3, padding=1)  # ε̂ of the slice (and its neighbours)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: torch.Tensor, cond: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        if self.cfg.conditional:
            if cond is None:
                raise ValueError("this model is conditional: pass the lung mask as cond")
            x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # [x_t ⊕ c], early fusion (Section 2.3)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels[0]).to(x_t.dtype))
        h = self.conv_in(x_t)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downsample):
            for b in blocks:
                h = b(h, emb)
            skips.append(h)
            h = down(h)
        for b in self.bottleneck:
            h = b(h, emb)
        for up, blocks in zip(self.upsample, self.up_blocks):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
