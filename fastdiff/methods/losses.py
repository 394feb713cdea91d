"""Loss pieces shared by methods (pure functions of tensors; nothing of ours imported)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def mean_abs_weight(x: torch.Tensor, x0_real: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    """DMD's and SiD's per-sample normaliser w = mean|x - x̂_real|, detached and floored (SiD's reference: 1e-5)."""
    return (x.detach().float() - x0_real.detach().float()).abs().flatten(1).mean(1).clamp_min(floor)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching direction, normalised per sample (DMD2 eq. 2 with the reference's weighting).

    g = (x̂_fake - x̂_real) / mean|x - x̂_real|; non-finite entries (a sample with zero weight) become 0.
    Descending along g moves x toward the real score's x0 and away from the fake score's.
    """
    weight = mean_abs_weight(x, x0_real, floor=1e-12)
    g = (x0_fake - x0_real) / weight.view(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """L_DM = 0.5 ||x - sg(x - g)||^2 (mean): its gradient w.r.t. x is g / numel."""
    g = dmd_gradient(x.detach().float(), x0_real.detach().float(), x0_fake.detach().float())
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g).detach())


def sid_loss(
    x: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    alpha: float = 1.0,
    weight: torch.Tensor | None = None,
    x0_fake_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample SiD generator loss (Zhou et al. 2024; official code mingyuanzhou/SiD):

        L_i = mean_elements[ (y_r - y_f) · ((y_r - x) - α (y_r - y_f')) ] / w_i,   y_r = x̂_real, y_f = x̂_fake

    y_f' = ``x0_fake_alpha`` (SiD-LSG's κ3-guided fake output; default y_f); w = ``weight`` (default
    ``mean_abs_weight``). At α = 1 this is (y_r - y_f) · (y_f - x) / w. Keep x, y_r, y_f attached: SiD's gradient runs
    through both score networks (the reference sums over elements; the mean differs by a constant factor).
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    x0_fake_alpha = x0_fake if x0_fake_alpha is None else x0_fake_alpha.float()
    diff = x0_real - x0_fake
    per = per_sample_mean(diff * ((x0_real - x) - alpha * (x0_real - x0_fake_alpha)))
    return per / (mean_abs_weight(x, x0_real) if weight is None else weight)


def denoising_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Denoising score matching in the network's native parametrisation: mean (w ·) ||pred - target||^2."""
    err = per_sample_mean((pred.float() - target.float()) ** 2)
    return (err if weight is None else weight * err).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real))."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Elementwise pseudo-Huber mean(sqrt((a - b)^2 + c^2) - c), as LCM and PCM use it."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c**2) - c).mean()


def hinge_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Hinge loss of a discriminator: mean relu(1 + D(fake)) + mean relu(1 - D(real))."""
    return F.relu(1 + logits_fake.float()).mean() + F.relu(1 - logits_real.float()).mean()


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -mean D(fake)."""
    return -logits_fake.float().mean()


def score_distillation_loss(x: torch.Tensor, eps_x: torch.Tensor, eps_target: torch.Tensor) -> torch.Tensor:
    """mean(sg(ε(x_t) - ε(y_t)) · x): score distillation of x toward a target y through a frozen noise predictor ε
    read at x and y noised with the same noise (TAD-SR's high-frequency score distillation). Its gradient with
    respect to x is (ε(x_t) - ε(y_t)) / numel."""
    return ((eps_x.detach().float() - eps_target.detach().float()) * x.float()).mean()
