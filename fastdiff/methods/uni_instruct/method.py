"""Uni-Instruct (Wang et al. 2025, arXiv 2505.20755): one-step distillation by the diffusion expansion of an
f-divergence, D_f(p_0 || q_0) = ∫ (g_t² / 2) E_{q_t}[h(r_t) ||s_p - s_q||²] dt (+ the t = T term), h(r) = f''(r) r²,
r = p_teacher / q_generator at x_t from a discriminator; trained by a tractable loss whose gradient equals the
gradient of the integrand J_t at the sampled t (derivation and weights: ``tractable``; exact check: ``expansion``).

Built on ``SiD`` (student sampler, k-step grids, guidance variants, fake-score training, NaN masking, export) and the
shared ``Critic`` (fake score + DMD2's GAN head, whose logit is log r). Networks: generator G, the frozen teacher,
a fake score f_ψ, and a discriminator head D on f_ψ's mid-block features.

Generator (x = G(z), t ~ U[min_step, max_step), x_t = α_t x + σ_t ε, y_r = teacher^{κ4}(x_t), y_f = f_ψ(x_t)):
    log r = clip(D(f_ψ features of x_t, t), ±max_log_ratio)   (no gradient)
    (h, r h', r² h'') at r, each divided by mean_batch h           (f-distill's batch normalisation; reverse KL: 1, 0, 0)
    L = score_weight · mean_i [h SiD_α - ½ r h' (y_r - y_f)·(y_r - y_f')] / w_i      (SIM-like branch, through both
                                                                                    score networks, as SiD)
      + kl_weight    · mean_i e_i mean(sg(y_f - y_r) · x),  e_i = ½ SNR(t_i) β_i / w_i (DI-like branch: DMD's direction
        β_i = r² h'' ||y_r - y_f||² + 2 r h' (y_r - y_f)·(x - y_f)   (no gradient)    weighted by β_i)
        |e_i| capped at beta_clip × median_batch |e| (sign kept; ``beta_clip=None``: exact). The exact e is
        heavy-tailed (max / median up to ~10⁴ on the GMM: forward KL's r up to e⁵ times SNR at small t) and the
        forward-KL GMM student diverged (exact: seed 1; clip 50: seed 0); at 10 it did not (assets/bench/gmm_uni/bench.md).
      + fdistill_weight · mean_i h_i · 0.5 ||x_i - sg(x_i - g_i)||²,  g = (y_f - y_r) / mean|x - y_r|
        (f-distill's gradient of D_f(p_t || q_t) itself, not of the expansion; off by default)
      (+ λ_G softplus(-D(x_t')) with real images, as DMD2 / SiD)
    w_i: SiD's normaliser (``weighting``). The defaults (score_weight = kl_weight = 1, fdistill_weight = 0, α = ½)
    give exactly ∇_θ E_t[λ(t) J_t] with ``weighting=snr`` (w a function of t alone); the default ``mean_abs`` also
    reweights samples by the detached 1 / mean|x - y_r|, as SiD and DMD2 do.
Critic (fake score, then generator, 1:1 as SiD): SiD's fake-score loss, plus the discriminator that estimates r:
    λ_D [softplus(D(x_t)) + softplus(-D(x^p_t))],  x^p = real images when the run has a dataset, else (data-free)
    teacher samples drawn with ``teacher_sample_steps`` deterministic DDIM steps (the teacher with CFG κ4).
    At the optimum D = log p_t - log q_t: the logit is log r.

Reductions (tests/methods/test_uni.py): reverse KL (h ≡ 1) has no DI-like branch and its SIM-like branch is SiD's
loss (score_weight = 1: SiD's generator gradient at the same α; α = ½ is the exact Fisher-divergence gradient);
reverse_kl with fdistill_weight = 1 and the other two 0 is DMD2's generator gradient.

Ours, not the paper's (whose Theorem 3.2 text we could not read): the split into branches and their weights are our
own derivation, checked numerically; SiD's per-sample normaliser w_i, the batch normalisation of the weights and
the clip of log r are kept from SiD / f-distill; α ≠ ½, fdistill_weight > 0 and a beta_clip that acts (outliers
only) leave the exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import schedule
from .. import losses
from ..base import RunContext, randint, randn
from ..critic import gan_wanted
from ..ode_pairs import ode_sample
from ..registry import register
from ..sid import SiD, SiDConfig, _finite_rows, _rows, guided
from . import divergences
from .tractable import ratio_branch, score_branch


@dataclass
class UniConfig(SiDConfig):
    """Uni-Instruct: SiD's keys (sampler, guidance, networks, optimiser) plus the divergence and the mix."""

    divergence: str = (
        "forward_kl"  # reverse_kl | softened_rkl | js | squared_hellinger | forward_kl | jeffreys | ...
    )
    alpha: float = 0.5  # SiD's α in the SIM-like branch; ½: the exact gradient of the expansion
    kl_weight: float = 1.0  # the DI-like branch: DMD's direction weighted by β (from r's dependence on x_t)
    score_weight: float = 1.0  # the SIM-like branch: h(r) · SiD_α - ½ r h'(r) ||y_r - y_f||²
    fdistill_weight: float = 0.0  # f-distill's h(r) · DMD2 term: ∇ D_f(p_t || q_t), not the expansion's
    normalize_weights: bool = True  # h(r) / batch mean of h(r) (f-distill)
    max_log_ratio: float = 5.0  # |log r| clip before h (forward KL's h = r grows exponentially in the logit)
    beta_clip: float | None = (
        10.0  # DI-like branch: cap |½ SNR β_i / w_i| at beta_clip × batch median; null: exact
    )
    teacher_sample_steps: int = (
        4  # data-free: DDIM steps of the teacher samples the discriminator sees as real
    )
    gan_critic_weight: float = 1.0  # λ_D of the density-ratio discriminator (the head alone trains on it)


@register
class UniInstruct(SiD):
    """Uni-Instruct on any denoisers: SiD's constructor arguments; ``head`` (DMD2's GAN head) is required for every
    divergence but reverse KL. ``with_gan``: add the generator's GAN term when real images come (as DMD2)."""

    name = "uni"
    config = UniConfig

    def __init__(self, *args, with_gan: bool = False, **kw):
        super().__init__(*args, **kw)
        c = self.cfg
        divergences.get(c.divergence)  # a clear error for an unknown name
        mix = (c.kl_weight, c.score_weight, c.fdistill_weight)
        if min(mix) < 0 or sum(mix) == 0:
            raise ValueError(
                "uni.kl_weight, uni.score_weight and uni.fdistill_weight must be >= 0 and not all 0, got "
                f"{c.kl_weight}, {c.score_weight}, {c.fdistill_weight}"
            )
        if not divergences.needs_ratio(c.divergence) and c.score_weight == 0 and c.fdistill_weight == 0:
            raise ValueError(
                "uni.divergence=reverse_kl has no DI-like branch (h is constant): set uni.score_weight or "
                "uni.fdistill_weight"
            )
        if divergences.needs_ratio(c.divergence) and self.critic.head is None:
            raise ValueError(
                f"uni.divergence={c.divergence} needs the discriminator head for the density ratio"
            )
        if c.teacher_sample_steps < 1:
            raise ValueError(f"uni.teacher_sample_steps must be >= 1, got {c.teacher_sample_steps}")
        self.with_gan = with_gan

    @property
    def needs_ratio(self) -> bool:
        return divergences.needs_ratio(self.cfg.divergence)

    # --- the density ratio -----------------------------------------------------------------------------------
    @torch.no_grad()
    def log_ratio(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """log r(x_t) = log p_t / q_t: the discriminator's logit on the fake score's features at (x_t, t)."""
        return self.critic.head(self.fake_score.mid_features(x_t.detach(), t, cond)).float()

    def sample_weights(self, x_t, t, cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h(r_i), r h'(r_i), r² h''(r_i)), divided by the batch mean of h (detached); reverse KL: (1, 0, 0)
        without a discriminator call."""
        c = self.cfg
        lr = self.log_ratio(x_t, t, cond) if self.needs_ratio else None
        return divergences.branch_weights(
            c.divergence, lr, x_t.shape[0], c.max_log_ratio, c.normalize_weights, device=x_t.device
        )

    @torch.no_grad()
    def teacher_samples(self, cond, n: int, generator, device) -> torch.Tensor:
        """Data-free "real" samples: the teacher (CFG κ4) with ``teacher_sample_steps`` deterministic DDIM steps."""

        def teacher(x, t, c):
            return guided(self.teacher, x, t, c, (self.plan.real,), self.null_cond)[0]

        noise = randn((n, *self.sample_shape), generator, device)
        return ode_sample(teacher, noise, cond, self.cfg.teacher_sample_steps, self.alphas_cumprod)

    # --- losses -----------------------------------------------------------------------------------------------
    def _generator_loss(self, batch, cond, n, k, generator, device, acp) -> dict[str, torch.Tensor]:
        plan, c = self.plan, self.cfg
        x = self._student_sample(cond, n, k, generator, device)
        t = randint(c.min_step, c.max_step, n, generator, device)
        x_t = schedule.add_noise(x, randn(x.shape, generator, device), t, acp)
        score = c.score_weight > 0
        with (
            torch.enable_grad() if score else torch.no_grad()
        ):  # the DI-like and f-distill branches need no graph through the scores
            x_in = x_t if score else x_t.detach()
            (y_r,) = guided(self.teacher, x_in, t, cond, (plan.real,), self.null_cond)
            scales = (plan.fake, plan.fake_alpha) if score else (plan.fake,)
            y_f, *rest = guided(self.fake_score, x_in, t, cond, scales, self.null_cond)
        y_f_alpha = rest[0] if rest else y_f
        ok = _finite_rows(x, y_r, y_f, y_f_alpha)
        if not ok.all():  # as SiD: non-finite rows leave the loss and their gradient
            if x_t.requires_grad and score:
                x_t.register_hook(lambda g: torch.where(_rows(ok, g), g, torch.zeros_like(g)))
            x, y_r, y_f, y_f_alpha = (
                torch.where(_rows(ok, v), v, torch.zeros_like(v)) for v in (x, y_r, y_f, y_f_alpha)
            )
        h, rh1, r2h2 = (
            torch.where(ok, torch.nan_to_num(v.to(device), nan=0.0, posinf=0.0, neginf=0.0), 0.0)
            for v in self.sample_weights(x_t, t, cond)
        )
        count = ok.sum().clamp_min(1)
        terms = {}
        if c.fdistill_weight > 0:
            terms["dm"] = c.fdistill_weight * (h * dmd_per_sample(x, y_r, y_f)).sum() / count
        if score or (c.kl_weight > 0 and self.needs_ratio):
            w = self._weight(x, y_r, t)
        if score:
            per = score_branch(x, y_r, y_f, h, rh1, c.alpha, w, y_f_alpha)
            terms["sid"] = c.score_weight * torch.where(ok, per, 0.0).sum() / count
        if c.kl_weight > 0 and self.needs_ratio:  # reverse KL: β ≡ 0
            snr = schedule.snr(acp, t).float()
            per = ratio_branch(x, y_r, y_f, rh1, r2h2, snr, w, c.beta_clip)
            terms["di"] = c.kl_weight * torch.where(ok, per, 0.0).sum() / count
        if self.with_gan and self.critic.gan_on(batch):
            terms["gan_g"] = c.gan_generator_weight * self.critic.generator_loss(x, cond, generator)
        return terms

    def _critic_loss(self, batch, cond, n, k, generator, device, acp) -> dict[str, torch.Tensor]:
        """SiD's fake-score loss; the discriminator (SiD's GAN-critic path) sees real images, or teacher samples."""
        if self.needs_ratio and batch.get("real") is None:
            batch = {**batch, "real": self.teacher_samples(batch["cond"], n, generator, device)}
        return super()._critic_loss(batch, cond, n, k, generator, device, acp)

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> UniInstruct:
        c = ctx.config
        divergences.get(c.divergence)
        with_gan = gan_wanted("uni", c.gan, ctx.with_real_data)
        method = cls.from_teacher(
            ctx.teacher,
            c,
            ctx.latent_shape,
            with_gan or divergences.needs_ratio(c.divergence),
            seed=ctx.run.seed,
        )
        method.with_gan = with_gan
        return method


def dmd_per_sample(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's L_DM per sample: 0.5 mean_elements (x - sg(x - g))², g = ``losses.dmd_gradient`` (its batch mean is
    ``losses.dmd_loss``)."""
    g = losses.dmd_gradient(x.detach().float(), x0_real.detach().float(), x0_fake.detach().float())
    return 0.5 * losses.per_sample_mean((x.float() - (x.detach().float() - g).detach()) ** 2)


__all__ = ["UniConfig", "UniInstruct", "dmd_per_sample"]
