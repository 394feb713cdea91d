"""The f-divergence family of Uni-Instruct / f-distill: each f with h(r) = f''(r) r² and its derivatives.

D_f(p || q) = E_q[f(p / q)], p the teacher's (noised) distribution, q the generator's, r = p / q at x_t. The gradient
of D_f(p_t || q_t) in the generator's parameters is (f-distill, Xu, Nie, Vahdat 2025, Thm. 1)

    ∇_θ D_f = -E_{z, ε}[ h(r(x_t)) (∇ log p_t(x_t) - ∇ log q_t(x_t)) ∂x_t/∂θ ],   h(r) = f''(r) r²,

so reverse KL (f = -log r, h ≡ 1) is DMD / Diff-Instruct's gradient (``fdistill_weight``). Uni-Instruct's expanded
divergence weights ||s_p - s_q||² by the same h; the exact gradient of the expansion needs r h'(r) and r² h''(r) too
(``tractable``). The table below is f-distill's Table 1 (reverse KL, softened reverse KL, Jensen-Shannon, squared
Hellinger, forward KL, Jeffreys) plus Pearson and Neyman χ²; h, r h' and r² h'' are worked out by hand (tests check
them against autograd on f and on h).

The weights are computed from log r (the discriminator's logit) to stay finite; ``weights`` and ``branch_weights``
clip log r and, as f-distill does, divide by the batch mean of h (the absolute scale of h then plays no part).
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
    rh1: Callable[[torch.Tensor], torch.Tensor]  # r h'(r), as a function of log r
    r2h2: Callable[[torch.Tensor], torch.Tensor]  # r² h''(r), as a function of log r


def _xlogx(r):
    return r * torch.log(r)


def _zero(lr):
    return torch.zeros_like(lr)


def _s(lr):  # r / (1 + r)
    return torch.sigmoid(lr)


def _c(lr):  # 1 / (1 + r)
    return torch.sigmoid(-lr)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        # name, f(r), then h = f'' r², r h', r² h'' as functions of log r
        Divergence("reverse_kl", lambda r: -torch.log(r), torch.ones_like, _zero, _zero),
        Divergence(
            "softened_rkl",
            lambda r: (r + 1) * torch.log((r + 1) / (2 * r)),
            _c,  # 1 / (1 + r)
            lambda lr: -_s(lr) * _c(lr),  # -r / (1 + r)²
            lambda lr: 2 * _s(lr) ** 2 * _c(lr),  # 2 r² / (1 + r)³
        ),
        Divergence(
            "js",
            lambda r: _xlogx(r) - (r + 1) * torch.log((r + 1) / 2),
            _s,  # r / (1 + r)
            lambda lr: _s(lr) * _c(lr),  # r / (1 + r)²
            lambda lr: -2 * _s(lr) ** 2 * _c(lr),  # -2 r² / (1 + r)³
        ),
        Divergence(
            "squared_hellinger",
            lambda r: 1 - torch.sqrt(r),
            lambda lr: 0.25 * torch.exp(0.5 * lr),  # √r / 4
            lambda lr: 0.125 * torch.exp(0.5 * lr),  # √r / 8
            lambda lr: -0.0625 * torch.exp(0.5 * lr),  # -√r / 16
        ),
        Divergence("forward_kl", _xlogx, torch.exp, torch.exp, _zero),  # h = r
        Divergence(
            "jeffreys", lambda r: (r - 1) * torch.log(r), lambda lr: torch.exp(lr) + 1, torch.exp, _zero
        ),
        Divergence(
            "pearson",
            lambda r: (r - 1) ** 2,
            lambda lr: 2 * torch.exp(2 * lr),  # h = 2 r²
            lambda lr: 4 * torch.exp(2 * lr),
            lambda lr: 4 * torch.exp(2 * lr),
        ),
        Divergence(
            "neyman",
            lambda r: (1 - r) ** 2 / r,
            lambda lr: 2 * torch.exp(-lr),  # h = 2 / r
            lambda lr: -2 * torch.exp(-lr),
            lambda lr: 4 * torch.exp(-lr),
        ),
    )
}


def get(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"uni.divergence must be one of {', '.join(DIVERGENCES)}, got {name!r}")
    return DIVERGENCES[name]


def needs_ratio(name: str) -> bool:
    """Whether the weight depends on r (everything but reverse KL): then a discriminator must estimate it."""
    return get(name).name != "reverse_kl"


def branch_weights(
    name: str,
    log_ratio: torch.Tensor | None,
    n: int,
    max_log_ratio: float = 5.0,
    normalize: bool = True,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (h(r), r h'(r), r² h''(r)) (detached, float32) for the tractable loss of ``tractable``, from
    log r = the discriminator's logit.

    log r is clipped to ±``max_log_ratio``; ``normalize`` divides all three by the batch mean of h (f-distill's
    normalisation: one positive factor per batch, the direction of the gradient is unchanged). Reverse KL needs no
    ratio (``log_ratio`` may be None) and gives exactly (1, 0, 0).
    """
    div = get(name)
    if not needs_ratio(name):
        ones = torch.ones(n, device=device if log_ratio is None else log_ratio.device)
        return ones, torch.zeros_like(ones), torch.zeros_like(ones)
    if log_ratio is None:
        raise ValueError(
            f"uni.divergence={name} weights samples by the density ratio: it needs the discriminator"
        )
    lr = log_ratio.detach().float().clamp(-max_log_ratio, max_log_ratio)
    h, rh1, r2h2 = div.h(lr), div.rh1(lr), div.r2h2(lr)
    if normalize:
        scale = h.mean().clamp_min(1e-12)
        h, rh1, r2h2 = h / scale, rh1 / scale, r2h2 / scale
    return h, rh1, r2h2


def weights(
    name: str,
    log_ratio: torch.Tensor | None,
    n: int,
    max_log_ratio: float = 5.0,
    normalize: bool = True,
    device=None,
) -> torch.Tensor:
    """Per-sample weights h(r) alone (``branch_weights``' first element)."""
    return branch_weights(name, log_ratio, n, max_log_ratio, normalize, device)[0]


def h_of_r(name: str, r: float) -> float:
    """h(r) at one ratio (for tables and tests)."""
    return float(get(name).h(torch.tensor(math.log(r), dtype=torch.float64)))
