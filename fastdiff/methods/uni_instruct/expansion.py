"""Exact check of the tractable loss (``tractable``) on 1-D Gaussian mixtures, by quadrature (float64).

Teacher p_0 = Σ_k π_k N(m_k, v_k), student q_θ = N(μ, e^{2 ℓ}), θ = (μ, ℓ), x_t = a x_0 + s ε at one fixed t. Both
diffused densities are closed-form mixtures, so J_t(θ) = ∫ q_t h(p_t / q_t) (s_p - s_q)² dx is a 1-D quadrature on a
fine grid and its gradient a central finite difference; the tractable loss's expected gradient is a Gauss-Hermite
quadrature over (z, ε) (x_0 = μ + e^ℓ z) of autograd gradients, with the exact scores and the exact ratio r held
fixed. Not part of training; tests/methods/test_uni.py and ``python -m fastdiff.methods.uni_instruct.expansion``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import divergences, tractable


@dataclass(frozen=True)
class Problem:
    weights: tuple[float, ...] = (0.3, 0.7)  # teacher mixture π_k
    means: tuple[float, ...] = (-1.0, 1.2)  # m_k
    variances: tuple[float, ...] = (0.25, 0.16)  # v_k
    a: float = 0.8  # α_t
    s: float = 0.6  # σ_t


def mixture(x: torch.Tensor, weights, means, variances) -> tuple[torch.Tensor, torch.Tensor]:
    """log density and score of Σ π_k N(m_k, v_k) at x (differentiable in x and in the parameters)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    m = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in means])
    v = torch.stack([torch.as_tensor(u, dtype=torch.float64) for u in variances])
    logk = torch.log(w) - 0.5 * torch.log(2 * math.pi * v) - 0.5 * (x[..., None] - m) ** 2 / v
    logp = torch.logsumexp(logk, -1)
    resp = torch.softmax(logk, -1)
    return logp, (resp * (m - x[..., None]) / v).sum(-1)


def teacher_t(x, pb: Problem):
    return mixture(x, pb.weights, [pb.a * m for m in pb.means], [pb.a**2 * v + pb.s**2 for v in pb.variances])


def student_t(x, theta: torch.Tensor, pb: Problem):
    mu, log_std = theta[0], theta[1]
    return mixture(x, (1.0,), [pb.a * mu], [pb.a**2 * torch.exp(2 * log_std) + pb.s**2])


def expanded_integrand(name: str, theta: torch.Tensor, pb: Problem, half_width: float = 14.0, n: int = 40001):
    """J_t(θ) = E_{q_t}[h(r) (s_p - s_q)²] by Simpson's rule on [-half_width, half_width]."""
    x = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    logp, sp = teacher_t(x, pb)
    logq, sq = student_t(x, theta, pb)
    f = torch.exp(logq) * divergences.get(name).h(logp - logq) * (sp - sq) ** 2
    dx = x[1] - x[0]
    return dx / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


def true_gradient(name: str, theta: torch.Tensor, pb: Problem, step: float = 1e-4) -> torch.Tensor:
    """∇_θ J_t by central differences of the quadrature."""
    out = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = step
        plus, minus = expanded_integrand(name, theta + e, pb), expanded_integrand(name, theta - e, pb)
        out[i] = (plus - minus) / (2 * step)
    return out


def _nodes(n: int):
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(z), torch.tensor(w / math.sqrt(2 * math.pi))


def _samples(theta, pb: Problem, n_nodes: int):
    """x_0, x_t on the Gauss-Hermite grid over (z, ε), their weights, and the exact x0 predictions at x_t."""
    z, wz = _nodes(n_nodes)
    zz, ee = torch.meshgrid(z, z, indexing="ij")
    weight = (wz[:, None] * wz[None, :]).reshape(-1)
    x = theta[0] + torch.exp(theta[1]) * zz.reshape(-1)
    x_t = pb.a * x + pb.s * ee.reshape(-1)
    logp, sp = teacher_t(x_t, pb)
    logq, sq = student_t(x_t, theta.detach(), pb)  # s_q: the student's score as a fixed function of x
    y_r = (x_t + pb.s**2 * sp) / pb.a  # Tweedie: x0 predictions
    y_f = (x_t + pb.s**2 * sq) / pb.a
    return x[:, None], y_r[:, None], y_f[:, None], (logp - logq).detach(), weight


def tractable_gradient(
    name: str, theta: torch.Tensor, pb: Problem, n_nodes: int = 120, parts: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """E[∇_θ L] of ``tractable``'s loss (unnormalised weights, w = 1) in J_t's units (times 2 a² / s⁴)."""
    theta = theta.detach().clone().requires_grad_(True)
    x, y_r, y_f, log_r, weight = _samples(theta, pb, n_nodes)
    div = divergences.get(name)
    h, rh1, r2h2 = div.h(log_r), div.rh1(log_r), div.r2h2(log_r)
    one = torch.ones_like(weight)
    snr = torch.full_like(weight, pb.a**2 / pb.s**2)
    scale = 2 * pb.a**2 / pb.s**4
    terms = {
        "score": (weight * tractable.score_branch(x, y_r, y_f, h, rh1, 0.5, one)).sum(),
        "ratio": (weight * tractable.ratio_branch(x, y_r, y_f, rh1, r2h2, snr, one)).sum(),
    }
    grads = {k: scale * torch.autograd.grad(v, theta, retain_graph=True)[0] for k, v in terms.items()}
    return grads if parts else grads["score"] + grads["ratio"]


def previous_gradient(
    name: str, theta: torch.Tensor, pb: Problem, alpha: float = 1.0, n_nodes: int = 120
) -> dict[str, torch.Tensor]:
    """The earlier combination, same units: h · DMD's term (gradient h (y_f - y_r) in x) and h · SiD_α, each with
    w = 1 and weight 1 (the DMD term's own normaliser mean|x - y_r| replaced by the common w = 1)."""
    theta = theta.detach().clone().requires_grad_(True)
    x, y_r, y_f, log_r, weight = _samples(theta, pb, n_nodes)
    h = divergences.get(name).h(log_r)
    one = torch.ones_like(weight)
    from .. import losses

    dmd = (h * ((y_f - y_r).detach() * x)[:, 0] * weight).sum()
    sid = (h * losses.sid_loss(x, y_r, y_f, alpha, one) * weight).sum()
    scale = 2 * pb.a**2 / pb.s**4
    g_dmd = scale * torch.autograd.grad(dmd, theta, retain_graph=True)[0]
    g_sid = scale * torch.autograd.grad(sid, theta)[0]
    return {"dmd": g_dmd, "sid": g_sid, "both": g_dmd + g_sid}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


THETAS = ((0.3, math.log(0.9)), (-0.6, math.log(0.5)))  # the student (μ, log std) of the reported checks


def table(theta=THETAS[0], pb: Problem | None = None) -> list[dict]:
    pb = pb or Problem()
    theta = torch.tensor(theta, dtype=torch.float64)
    rows = []
    for name in divergences.DIVERGENCES:
        true = true_gradient(name, theta, pb)
        parts = tractable_gradient(name, theta, pb, parts=True)
        ours = parts["score"] + parts["ratio"]
        old = previous_gradient(name, theta, pb, alpha=1.0)
        rows.append(
            {
                "theta": theta.tolist(),
                "divergence": name,
                "true": true.tolist(),
                "tractable": ours.tolist(),
                "rel_err": relative_error(ours, true),
                "ratio_branch": parts["ratio"].tolist(),
                "score_only_rel_err": relative_error(parts["score"], true),
                "old_rel_err": relative_error(old["both"], true),
                "old_cos": cosine(old["both"], true),
                "old_sid_only_cos": cosine(old["sid"], true),
                "old_dmd_only_cos": cosine(old["dmd"], true),
            }
        )
    return rows


if __name__ == "__main__":
    for row in (row for theta in THETAS for row in table(theta)):
        print(
            f"θ = ({row['theta'][0]:+.2f}, {row['theta'][1]:+.3f}) "
            f"{row['divergence']:>18}: true [{row['true'][0]:+.6f}, {row['true'][1]:+.6f}]  "
            f"tractable [{row['tractable'][0]:+.6f}, {row['tractable'][1]:+.6f}]  rel err {row['rel_err']:.1e}  "
            f"(without the DI-like branch {row['score_only_rel_err']:.2f})  previous (kl=score=1, α=1): rel err "
            f"{row['old_rel_err']:.2f}, cos {row['old_cos']:+.3f} (SiD part {row['old_sid_only_cos']:+.3f}, "
            f"DMD part {row['old_dmd_only_cos']:+.3f})"
        )
