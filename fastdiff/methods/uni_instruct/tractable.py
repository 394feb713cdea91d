"""The tractable loss whose gradient is the exact gradient of the expanded f-divergence at one t.

The expansion (f-divergence along the forward process x_t = α_t x_0 + σ_t ε, r_t = p_t / q_t,
d = s_p - s_q = ∇ log r_t, h(r) = f''(r) r²): d/dt D_f(p_t || q_t) = -(g_t² / 2) E_{q_t}[h(r_t) ||d||²], so

    D_f(p_0 || q_0) = ∫ (g_t² / 2) J_t dt + D_f(p_T || q_T),   J_t(θ) = E_{x_t ~ q_θ,t}[ h(r_t) ||s_p - s_q||² ].

θ enters J_t through the sample positions, through q_t inside r_t and through s_q. With δ the derivative in θ and
c = ∇_{x_t} log q_t(x_t | x_0) = -ε / σ_t (constant along θ at fixed z, ε):

    δJ_t = ∫ δq_t (h - r h') ||d||²  -  2 E_q[h d · δs_q]
         = δ E_{z,ε}[ (h - r h') ||d||² + 2 h d · (s_q - c) ]      (score identity on the last term; r, d, s_q as
                                                                  fixed functions of x, evaluated at x_t(θ))
and differentiating the fixed functions h(r(x)), A(r(x)) through x uses ∇_x r = r d. With r held fixed (the
discriminator's estimate, no gradient), the missing part is a Diff-Instruct-like term. The exact tractable loss is

    L = (h - r h') ||d||² + 2 h d · (s_q - c)                                        (SIM-like branch)
      + sg[β] sg(s_q - s_p) · x_t,   β = r² h'' ||d||² + 2 r h' d · (c - s_q)          (DI-like branch)

with every network output differentiated through its input x_t (network parameters held fixed), r held fixed:
∇_θ E[L] = ∇_θ J_t exactly (``expansion`` checks it by quadrature on 1-D Gaussian mixtures). In x0 terms
(s = (α y - x_t) / σ², y_r teacher, y_f fake score, x the generator's sample), divided by 2 α² / σ⁴:

    L / (2α²/σ⁴) = h · SiD_{α=1/2} - ½ r h' ||y_r - y_f||²  +  ½ SNR(t) sg[β'] sg(y_f - y_r) · x,
    SiD_α = (y_r - y_f) · ((y_r - x) - α (y_r - y_f)),   β' = r² h'' ||y_r - y_f||² + 2 r h' (y_r - y_f) · (x - y_f).

So the SIM-like branch is SiD's loss weighted by h(r) with a per-sample α(r) = ½ (1 + r h'(r) / h(r)) (reverse
KL: ½, forward KL: 1, Pearson: 3/2, Neyman: 0), and the DI-like branch is DMD's direction weighted by β', a
function of r *and* of the sample (not of r alone); it vanishes for reverse KL (h ≡ 1), where the gradient is
SiD's at α = ½, the pure score-identity (Fisher divergence) gradient. SiD's own α (default 1, paper 1.2) adds
(α - ½) times the gradient of -||y_r - y_f||² through both networks: a change of objective, not of estimator.

Each branch below is per sample, in SiD's units: element means, divided by SiD's detached per-sample normaliser w.
"""

from __future__ import annotations

import torch

from .. import losses


def score_branch(
    x: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    h: torch.Tensor,
    rh1: torch.Tensor,
    alpha: float = 0.5,
    weight: torch.Tensor | None = None,
    x0_fake_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """SIM-like branch per sample: h · SiD_α - ½ r h'(r) (y_r - y_f) · (y_r - y_f'), over w.

    Keep x, y_r, y_f attached (gradient through both score networks, as SiD); h = h(r), rh1 = r h'(r) detached.
    ``alpha`` = ½ is the exact gradient; y_f' = ``x0_fake_alpha`` (SiD-LSG's κ3 fake; default y_f).
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    x0_fake_alpha = x0_fake if x0_fake_alpha is None else x0_fake_alpha.float()
    w = losses.mean_abs_weight(x, x0_real) if weight is None else weight
    sid = losses.sid_loss(x, x0_real, x0_fake, alpha, w, x0_fake_alpha)
    fisher = losses.per_sample_mean((x0_real - x0_fake) * (x0_real - x0_fake_alpha)) / w
    return h * sid - 0.5 * rh1 * fisher


def ratio_weight(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, rh1: torch.Tensor, r2h2: torch.Tensor
) -> torch.Tensor:
    """β' = r² h'' ||y_r - y_f||² + 2 r h' (y_r - y_f) · (x - y_f) per sample (sums over elements; detached)."""
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    diff = (x0_real - x0_fake).flatten(1)
    return r2h2 * diff.pow(2).sum(1) + 2 * rh1 * (diff * (x - x0_fake).flatten(1)).sum(1)


def clip_to_median(weight: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Per-sample weights with |weight| capped at ``clip`` times the batch median of |weight| (sign kept);
    ``None``: unchanged. Only outliers move: a batch whose |weight| all lie within ``clip`` medians is returned
    as is."""
    if clip is None:
        return weight
    if clip <= 0:
        raise ValueError(f"the clip must be > 0 or None, got {clip}")
    bound = clip * weight.detach().abs().median()
    return weight.clamp(-bound, bound)


def ratio_branch(
    x: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    rh1: torch.Tensor,
    r2h2: torch.Tensor,
    snr: torch.Tensor,
    weight: torch.Tensor | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """DI-like branch per sample: ½ SNR(t) β' mean(sg(y_f - y_r) · x) / w: its gradient in x is
    ½ SNR β' (y_f - y_r) / (numel w), DMD's direction weighted by β' (only x carries gradient).

    ``clip``: cap the per-sample effective weight e_i = ½ SNR(t_i) β'_i / w_i at ``clip`` × median_batch |e|
    (``clip_to_median``); ``None`` (default here): the exact estimator. The exact one is heavy-tailed (forward KL:
    β' = 2 r Δ·(x - y_f) with r up to e^max_log_ratio, SNR up to ~10⁴ at small t) and diverged on the GMM."""
    w = losses.mean_abs_weight(x, x0_real) if weight is None else weight
    beta = ratio_weight(x, x0_real, x0_fake, rh1, r2h2)
    eff = clip_to_median(0.5 * snr.float() * beta / w, clip)
    direction = (x0_fake.detach().float() - x0_real.detach().float()) * x.float()
    return eff * losses.per_sample_mean(direction)


__all__ = ["clip_to_median", "ratio_branch", "ratio_weight", "score_branch"]
