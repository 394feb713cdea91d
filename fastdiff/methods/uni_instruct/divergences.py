"""The f-divergence family of Uni-Instruct / f-distill: each f with the weight it gives the score difference.

D_f(p || q) = E_q[f(p / q)], p the teacher's (noised) distribution, q the generator's, r = p / q at x_t. The gradient
of D_f(p_t || q_t) in the generator's parameters is (f-distill, Xu, Nie, Vahdat 2025, Thm. 1)

    ∇_θ D_f = -E_{z, ε}[ h(r(x_t)) (∇ log p_t(x_t) - ∇ log q_t(x_t)) ∂x_t/∂θ ],   h(r) = f''(r) r²,

so reverse KL (f = -log r, h ≡ 1) is DMD / Diff-Instruct's gradient. The table below is f-distill's Table 1 (reverse
KL, softened reverse KL, Jensen-Shannon, squared Hellinger, forward KL, Jeffreys) plus Pearson and Neyman χ²; each h
is f''(r) r² worked out by hand (tests check it against autograd on f).

The weights are computed from log r (the discriminator's logit) to stay finite; ``weights`` clips log r and, as
f-distill does, divides h by its batch mean (the absolute scale of h then plays no part).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Divergence:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]  # the generator f(r), r > 0 (f(1) = 0, convex)
    h: Callable[[torch.Tensor], torch.Tensor]  # h(r) = f''(r) r², as a function of log r


def _xlogx(r):
    return r * torch.log(r)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("reverse_kl", lambda r: -torch.log(r), lambda lr: torch.ones_like(lr)),
        Divergence(
            "softened_rkl",
            lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
            lambda lr: torch.sigmoid(-lr),  # 1 / (1 + r)
        ),
        Divergence(
            "js",
            lambda r: _xlogx(r) - (r + 1) * torch.log((r + 1) / 2),
            torch.sigmoid,  # r / (1 + r)
        ),
        Divergence("squared_hellinger", lambda r: 1 - torch.sqrt(r), lambda lr: 0.25 * torch.exp(0.5 * lr)),
        Divergence("forward_kl", _xlogx, torch.exp),  # h = r
        Divergence("jeffreys", lambda r: (r - 1) * torch.log(r), lambda lr: torch.exp(lr) + 1),
        Divergence("pearson", lambda r: (r - 1) ** 2, lambda lr: 2 * torch.exp(2 * lr)),  # h = 2 r²
        Divergence("neyman", lambda r: (1 - r) ** 2 / r, lambda lr: 2 * torch.exp(-lr)),  # h = 2 / r
    )
}


def get(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"uni.divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    return DIVERGENCES[name]


def needs_ratio(name: str) -> bool:
    """Whether the weight depends on r (everything but reverse KL): then a discriminator must estimate it."""
    return get(name).name != "reverse_kl"


def weights(
    name: str,
    log_ratio: torch.Tensor | None,
    n: int,
    max_log_ratio: float = 5.0,
    normalize: bool = True,
    device=None,
) -> torch.Tensor:
    """Per-sample weights h(r) (detached, float32) from log r = the discriminator's logit.

    log r is clipped to ±``max_log_ratio``; ``normalize`` divides by the batch mean (f-distill's normalisation).
    Reverse KL needs no ratio (``log_ratio`` may be None) and gives exactly ones.
    """
    div = get(name)
    if not needs_ratio(name):
        return torch.ones(n, device=device if log_ratio is None else log_ratio.device)
    if log_ratio is None:
        raise ValueError(
            f"uni.divergence={name} weights samples by the density ratio: it needs the discriminator"
        )
    lr = log_ratio.detach().float().clamp(-max_log_ratio, max_log_ratio)
    h = div.h(lr)
    if normalize:
        h = h / h.mean().clamp_min(1e-12)
    return h


def h_of_r(name: str, r: float) -> float:
    """h(r) at one ratio (for tables and tests)."""
    return float(get(name).h(torch.tensor(math.log(r), dtype=torch.float64)))
