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


class TimeAwareHead(nn.Module):
    """A time-conditioned discriminator head on one scale of a frozen UNet encoder's features (TAD-SR's): GroupNorm
    whose scale and shift come from the timestep embedding (FiLM, zero-initialised: at first the head sees t only
    through the features), SiLU, a 3x3 conv, SiLU, a 1x1 conv to a logit map; both convs spectrally normalised.

    Args:
        channels: feature channels at this scale.
        embed_dim: width of the timestep embedding.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.film = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv = sn(nn.Conv2d(channels, channels, 3, padding=1))
        self.out = sn(nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedding).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm(features.float()) * (1 + scale) + shift
        return self.out(nn.functional.silu(self.conv(nn.functional.silu(h))))


class TimeAwareDiscriminator(nn.Module):
    """TAD-SR's discriminator heads: one ``TimeAwareHead`` per encoder scale, sharing a sinusoidal timestep
    embedding and MLP; the logit of a sample is the mean over every head's logit map.

    Args:
        channels: the feature channels of each scale (e.g. each down block's and the mid block's).
        embed_dim: width of the timestep embedding.
    """

    def __init__(self, channels: list[int], embed_dim: int = 128):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.heads = nn.ModuleList(TimeAwareHead(c, embed_dim) for c in channels)

    def forward(self, features: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        if len(features) != len(self.heads):
            raise ValueError(f"{len(self.heads)} discriminator heads got {len(features)} feature maps")
        emb = self.mlp(get_timestep_embedding(t.float().flatten(), self.embed_dim).to(features[0].device))
        logits = [head(f, emb).flatten(1).mean(1) for head, f in zip(self.heads, features)]
        return torch.stack(logits).mean(0)


def unet_encoder_channels(unet) -> list[int]:
    """The channels of a UNet's encoder features as ``encoder_features`` returns them (down blocks, then mid)."""
    blocks = list(unet.config.block_out_channels)
    return [*blocks, blocks[-1]]
