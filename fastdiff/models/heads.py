"""Small trainable heads that sit on a score network: DMD2's discriminator head."""

from __future__ import annotations

import math

import torch
from torch import nn


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DiscriminatorHead(nn.Module):
    """DMD2's GAN head on the fake score's mid-block features: (conv 4x4 stride 2, GroupNorm, SiLU) repeated until
    the map is 1x1, then a 1x1 conv to one logit per sample. For vector features (small test networks) an MLP.

    Args:
        channels: feature channels (the UNet's last ``block_out_channels``) or vector width.
        spatial: side of the feature map; ``None`` for vector features.
    """

    def __init__(self, channels: int, spatial: int | None = None):
        super().__init__()
        if spatial is None:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
            return
        layers: list[nn.Module] = []
        size = spatial
        while size > 1:
            layers += [
                nn.Conv2d(channels, channels, 4, 2, 1),
                nn.GroupNorm(_groups(channels), channels),
                nn.SiLU(),
            ]
            size = (size + 1) // 2
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features.float())
        return out.flatten(1).mean(1)


def unet_discriminator_head(unet, latent_shape) -> DiscriminatorHead:
    """A ``DiscriminatorHead`` sized for a diffusers UNet's mid-block features on latents of ``latent_shape``."""
    blocks = unet.config.block_out_channels
    return DiscriminatorHead(blocks[-1], latent_shape[-1] // 2 ** (len(blocks) - 1))
