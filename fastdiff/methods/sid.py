"""SiD: score identity distillation (Zhou et al., ICML 2024), data-free. Official code: mingyuanzhou/SiD (EDM) and
mingyuanzhou/SiD-LSG (Stable Diffusion: ``training/sid_training_loop.py``); few-step, Zero-CFG and Anti-CFG from
"Few-Step Diffusion via Score identity Distillation" (Zhou, Gu, Wang 2025).

Networks: generator G (x0 at fixed student timesteps), the frozen teacher f_φ, and a fake score f_ψ of the
generator's distribution; G and f_ψ start from the teacher (full copies or LoRA adapters, as DMD2). Only prompts.

Fake score (updated first, then the generator: 1:1):
    c' = c with ``prompt_dropout`` of the prompts emptied (lsg, anti_cfg; see "Prompt dropout" below)
    x = sg(G(z, c')),  t ~ U[min_step, max_step),  x_t = α_t x + σ_t ε
    L_fake = mean ||ε̂^{κ1}(x_t, c') - ε||²
    (+ λ_D [softplus(D(fake_t)) + softplus(-D(real_t))] with real images: the diffusion-GAN head on f_ψ)
Generator (gradients flow through BOTH score networks: no stop-gradient on y_r, y_f):
    x = G(z),  t ~ U[min_step, max_step),  x_t = α_t x + σ_t ε
    y_r = f_φ^{κ4}(x_t, c),  y_f = f_ψ^{κ2}(x_t, c),  y_f' = f_ψ^{κ3}(x_t, c)      (f^κ = f(∅) + κ (f(c) - f(∅)))
    L_SiD = mean_i  mean_elements[ (y_r - y_f) · ((y_r - x) - α (y_r - y_f')) ] / w_i
    w_i = mean|x_i - y_r,i| (detached; the reference)  or  σ_t = 1 / sqrt(1 + SNR(t)) (``weighting=snr``: the
          reference's normaliser for unit-variance data, as a function of t alone)
    (+ λ_G softplus(-D(x_t'')) with real images)
Per-sample NaN masking (as the reference): samples whose x, y_r or y_f is not finite leave the loss, and their
gradient rows are zeroed before they reach the generator.

Guidance (κ1: fake training; κ2, κ3: fake in the generator loss; κ4: teacher; κ = 0 is one unconditional call):
    cfg       (1, 1, 1, w)          standard CFG on the teacher only
    lsg       (κ1, κ2, κ3, κ4)      long and short guidance: κ_i = guidance_scale unless lsg_scales gives all four
                                    (the reference ties κ2 = κ3); the fake trains with its own CFG, 10% empty prompts
    zero_cfg  (0, 0, 0, 1)          no CFG in the teacher, the fake score never sees the prompt
    anti_cfg  (1, 1+λ, 1+λ, 1)      negative CFG in the fake score: y_f = f_ψ(c) + λ (f_ψ(c) - f_ψ(∅)), -1 < λ < 0
                                    (``anti_cfg_scale``; the fake trains with 10% empty prompts)
Zero- and Anti-CFG guide through the fake score. With κ = κ2 = κ3 < 1 the generator moves along
(y_r - f_ψ(c)) + (1 - κ) (f_ψ(c) - f_ψ(∅)): it matches the teacher and climbs its *own* class posterior q(c|x), a
push that fades once its classes are apart, where teacher CFG keeps climbing p(c|x) and drains modes that classes
share (stationary point: s_q(x|c) = s_q(x) + (s_p(x|c) - s_q(x)) / κ). λ <= -1 (κ <= 0 with a conditional fake)
has no such point (κ < 0: an anti-guided one) and diverged on the analytic teacher, hence the range.

Prompt dropout (``prompt_dropout_mode``): what the fake score's empty-prompt output f_ψ(·|∅) learns.
    reference  (SiD-LSG's training loop) the dropped rows' prompts are emptied *before* the generator samples:
               x = G(z, ∅) and the fake trains on (x, ∅) for them, so f_ψ(·|∅) is the score of the generator's
               output for the empty prompt (which the generator loss never trains: it moves only through the
               weights it shares with the prompted generator). Only when the fake score's ∅ output is used, i.e.
               some of κ1, κ2, κ3 is not 1 (the reference drops when κ1 ≠ 1 or κ2 = κ3 ≠ 1; κ4 plays no part).
    fake_only  the generator samples with the full prompt and only the fake score's condition is emptied, so
               f_ψ(·|∅) is the score of the generator's marginal over prompts; drops whenever ``prompt_dropout`` > 0.
    auto       (default) reference for lsg; fake_only for anti_cfg, whose own-posterior guidance (above) needs
               f_ψ(·|∅) to be the generator's marginal: with ``reference`` it drained the modes that classes share
               on the analytic teacher, as teacher CFG does.
The drop mask is drawn from the step's generator (a function of seed, step, rank and micro-batch).

Few-step (``num_steps`` = K > 1): each iteration draws k ~ U{1..K}, the same k on every rank (from a generator
seeded by the step) and for both updates of the step, and runs k steps on the k-step grid
t_i = t_0 - floor((t_0 + 1) i / k) (t_0 = ``init_timestep``; at t_0 = 999 exactly LCMScheduler's timesteps with
``original_inference_steps=1000``), with fresh noise between steps and gradient only through the last: one
generator matches the uniform mixture of its 1..K-step outputs and samples at any k <= K.

Deviations from the reference, on purpose: the first input is pure noise z labelled t_0, as a diffusers pipeline
feeds it (the reference feeds σ_{t_0} z: 0.93 z at t_0 = 625, 0.998 z at 999), so exports reproduce ``generate``;
losses are means over elements rather than sums (a constant factor Adam ignores), so DMD2's GAN weights keep
their meaning. EMA (``ema_decay``; the recipes translate the reference's half-life of 50k images): as in the
reference, only the exported / evaluated generator is G_ema, every training sample comes from the live G; the
trainer's EMA warm-up (decay <= (1 + n) / (10 + n) after n updates) stands in for the reference's ramp (half-life
<= 5% of the images seen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import schedule
from ..config import OptimizerConfig, optim_field
from ..models.denoiser import Cond, Denoiser, cat_conds
from ..recipe import Recipe, StepRecipe, derive_scheduler
from . import losses, student
from .base import Group, RunContext, optimizer_settings, randint, randn
from .critic import CriticMethod, gan_wanted, student_and_fake
from .registry import register

GUIDANCE = ("cfg", "lsg", "zero_cfg", "anti_cfg")
DROPOUT_MODES = ("auto", "reference", "fake_only")
WEIGHTINGS = ("mean_abs", "snr")


@dataclasses.dataclass(frozen=True)
class GuidancePlan:
    """The four SiD-LSG scales and the fake score's prompt dropout of one guidance variant."""

    fake_train: float  # κ1: CFG of the fake score while it trains
    fake: float  # κ2: fake score in (y_r - y_f)
    fake_alpha: float  # κ3: fake score in α (y_r - y_f')
    real: float  # κ4: the teacher
    prompt_dropout: float  # the share of rows whose prompt is emptied while the fake score trains
    sample_dropped: bool = False  # the generator samples those rows with ∅ too (mode ``reference``)


@dataclass
class SiDConfig:
    """SiD, score identity distillation (Zhou et al. 2024), with SiD-LSG guidance (Zhou et al. 2025) and the
    few-step uniform mixture, Zero-CFG and Anti-CFG (Zhou, Gu, Wang 2025); defaults: the SiD-LSG SD1.5 reference."""

    alpha: float = 1.0  # α in (y_r - y_f)·[(y_r - x) - α (y_r - y_f)]; 1.2 is the SiD paper's other setting
    guidance: str = "lsg"  # cfg | lsg | zero_cfg | anti_cfg
    guidance_scale: float = 1.5  # cfg: teacher CFG; lsg: κ1..κ4 (1.5 best FID); not used by zero/anti_cfg
    lsg_scales: list[float] | None = None  # lsg: explicit [κ1, κ2, κ3, κ4] instead of guidance_scale
    anti_cfg_scale: float = -0.5  # anti_cfg: λ in (-1, 0); the fake score is f(c) + λ (f(c) - f(∅))
    prompt_dropout: float = 0.1  # lsg / anti_cfg: empty-prompt rate while training the fake score
    prompt_dropout_mode: str = (
        "auto"  # reference | fake_only | auto: reference for lsg, fake_only for anti_cfg
    )
    weighting: str = "mean_abs"  # mean_abs: 1 / mean|x - y_r| per sample (reference) | snr: sqrt(1 + SNR(t))
    num_steps: int = 1  # K: the generator learns the uniform mixture of its 1..K-step outputs
    init_timestep: int = 625  # t of the first generator step (input: pure noise); few-step: 999
    min_step: int = 20  # t ~ U[min_step, max_step) for the generator and fake-score losses
    max_step: int = 980
    generator: str = "full"  # full | lora
    fake_score: str = "full"  # full | lora
    shared_base: bool = False  # generator and fake score as two adapters on the one frozen teacher UNet
    lora_rank: int = 64
    lora_alpha: int = 8
    generator_lr: float = 1.0e-6
    fake_lr: float = 1.0e-6
    optim: OptimizerConfig = optim_field(
        betas=[0.0, 0.999]
    )  # Adam (0, 0.999), as the reference; it clips only in fp16
    gan: str = "auto"  # auto (on when a dataset of real images is given) | on | off
    gan_generator_weight: float = 5e-3  # λ_G (DMD2's SDXL weights; the head is DMD2's)
    gan_critic_weight: float = 1e-2
    ema_decay: float | None = None


def guidance_plan(cfg: SiDConfig) -> GuidancePlan:
    """The scales a ``sid.guidance`` variant uses and its prompt dropout (see the module docstring), checked."""
    if cfg.prompt_dropout_mode not in DROPOUT_MODES:
        raise ValueError(
            f"sid.prompt_dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {cfg.prompt_dropout_mode!r}"
        )
    if cfg.guidance == "cfg":
        return GuidancePlan(1.0, 1.0, 1.0, cfg.guidance_scale, 0.0)
    if cfg.guidance == "lsg":
        scales = [cfg.guidance_scale] * 4 if cfg.lsg_scales is None else list(cfg.lsg_scales)
        if len(scales) != 4:
            raise ValueError(f"sid.lsg_scales must list [κ1, κ2, κ3, κ4], got {scales}")
        return _with_dropout(cfg, "reference", *map(float, scales))
    if cfg.guidance == "zero_cfg":
        return GuidancePlan(0.0, 0.0, 0.0, 1.0, 0.0)
    if cfg.guidance == "anti_cfg":
        if not -1 < cfg.anti_cfg_scale < 0:
            raise ValueError(f"sid.anti_cfg_scale must be in (-1, 0) (Anti-CFG), got {cfg.anti_cfg_scale}")
        kappa = 1.0 + float(cfg.anti_cfg_scale)  # f(c) + λ (f(c) - f(∅)) = f(∅) + (1 + λ) (f(c) - f(∅))
        return _with_dropout(cfg, "fake_only", 1.0, kappa, kappa, 1.0)
    raise ValueError(f"sid.guidance must be one of {', '.join(GUIDANCE)}, got {cfg.guidance!r}")


def _with_dropout(
    cfg: SiDConfig, auto: str, fake_train: float, fake: float, fake_alpha: float, real: float
) -> GuidancePlan:
    """The plan with the prompt dropout of ``cfg.prompt_dropout_mode`` (``auto`` resolves to ``auto``)."""
    mode = auto if cfg.prompt_dropout_mode == "auto" else cfg.prompt_dropout_mode
    if mode == "fake_only":
        return GuidancePlan(fake_train, fake, fake_alpha, real, cfg.prompt_dropout)
    uses_fake_uncond = any(k != 1 for k in (fake_train, fake, fake_alpha))
    rate = cfg.prompt_dropout if uses_fake_uncond else 0.0
    return GuidancePlan(fake_train, fake, fake_alpha, real, rate, sample_dropped=True)


def step_timesteps(num_steps: int, init_timestep: int) -> list[int]:
    """The k-step grid t_i = t_0 - floor((t_0 + 1) i / k), i < k: uniform from t_0 towards 0.

    At t_0 = T - 1 these are LCMScheduler(original_inference_steps=T)'s timesteps: [999], [999, 499],
    [999, 666, 333], [999, 749, 499, 249] for T = 1000.
    """
    if not 1 <= num_steps <= init_timestep + 1:
        raise ValueError(f"the number of steps must be in [1, {init_timestep + 1}], got {num_steps}")
    return [init_timestep - (init_timestep + 1) * i // num_steps for i in range(num_steps)]


def draw_num_steps(step: int, max_steps: int, seed: int = 0) -> int:
    """k ~ U{1..K} for one iteration, a function of (seed, step) only: every rank draws the same k."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 53) % (2**63))
    return int(torch.randint(1, max_steps + 1, (1,), generator=g))


def guided(net: nn.Module, x_t, t, cond, scales, null_cond: Callable, native: bool = False) -> list:
    """``net`` with classifier-free guidance at each of ``scales``: f(∅) + κ (f(c) - f(∅)), from one batched call.

    κ = 1 needs only the conditional call and κ = 0 only the unconditional one. ``native=True`` combines the raw
    network outputs (CFG is the same affine combination in eps, v and x0 space).
    """
    call = net.native if native else net
    n = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).expand(n)
    need_uncond, need_cond = any(s != 1 for s in scales), any(s != 0 for s in scales)
    uncond = cond_out = None
    if need_uncond and need_cond:
        both = call(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds([null_cond(n), cond])).float()
        uncond, cond_out = both.chunk(2)
    elif need_uncond:
        uncond = call(x_t, t, null_cond(n)).float()
    else:
        cond_out = call(x_t, t, cond).float()
    return [cond_out if s == 1 else uncond if s == 0 else uncond + s * (cond_out - uncond) for s in scales]


def replace_rows(cond, other, mask: torch.Tensor):
    """``cond`` with the rows where ``mask`` is true taken from ``other`` (label tensors or ``Cond``)."""

    def pick(a, b):
        return torch.where(mask.view(-1, *[1] * (a.ndim - 1)).to(a.device), b.to(a.device, a.dtype), a)

    if isinstance(cond, torch.Tensor):
        return pick(cond, other)
    return Cond(
        **{
            f.name: None
            if getattr(cond, f.name) is None
            else pick(getattr(cond, f.name), getattr(other, f.name))
            for f in dataclasses.fields(Cond)
        }
    )


def _finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for v in tensors:
        ok &= torch.isfinite(v).flatten(1).all(1)
    return ok


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1))


@register
class SiD(CriticMethod):
    """Score identity distillation on any denoisers (UNets, LoRA adapters on a shared UNet, or test networks).

    Args:
        generator: the student, read as an x0 predictor at the k-step grids.
        fake_score: f_ψ, trainable, conditional (it sees the empty prompt under prompt dropout / Zero-CFG).
        teacher: f_φ, the teacher's conditional x0 prediction *without* CFG (the guidance variant applies it).
        cfg: the SiD section of the config.
        sample_shape: shape of one sample (C, H, W) or (D,).
        generator_params / fake_params: the trainable parameters of each network, by stable name.
        null_cond: ``null_cond(n)``, the unconditional input of a batch of n (SDXL: zeroed embeddings).
        head: the diffusion-GAN head on the fake score's features, or None (no GAN term).
        seed: seeds the per-iteration draw of k (with the step), identical on every rank.
    """

    name = "sid"
    config = SiDConfig

    def __init__(
        self,
        generator: Denoiser,
        fake_score: Denoiser,
        teacher: nn.Module,
        cfg: SiDConfig,
        sample_shape: tuple[int, ...],
        generator_params: dict[str, nn.Parameter],
        fake_params: dict[str, nn.Parameter],
        null_cond: Callable,
        head: nn.Module | None = None,
        seed: int = 0,
        num_train_timesteps: int = 1000,
    ):
        plan = guidance_plan(cfg)
        if cfg.weighting not in WEIGHTINGS:
            raise ValueError(f"sid.weighting must be one of {', '.join(WEIGHTINGS)}, got {cfg.weighting!r}")
        if not 0 <= cfg.prompt_dropout < 1:
            raise ValueError(f"sid.prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
        if not 0 <= cfg.min_step < cfg.max_step <= num_train_timesteps:
            raise ValueError(
                f"sid.min_step < sid.max_step must lie in [0, {num_train_timesteps}], "
                f"got {cfg.min_step}, {cfg.max_step}"
            )
        if not 0 < cfg.init_timestep < num_train_timesteps:
            raise ValueError(
                f"sid.init_timestep must be in [1, {num_train_timesteps - 1}], got {cfg.init_timestep}"
            )
        if cfg.num_steps < 1:
            raise ValueError(f"sid.num_steps must be at least 1, got {cfg.num_steps}")
        super().__init__(
            generator, fake_score, cfg, sample_shape, generator_params, fake_params, head, num_train_timesteps
        )
        self.teacher, self.null_cond, self.seed, self.plan = teacher, null_cond, seed, plan
        self.student_timesteps = step_timesteps(cfg.num_steps, cfg.init_timestep)

    @property
    def timesteps_by_steps(self) -> dict[int, list[int]]:
        """The grid of every step count the generator was trained for (k = 1..K), for export."""
        return {k: self.timesteps_for(k) for k in range(1, self.cfg.num_steps + 1)}

    def timesteps_for(self, k: int) -> list[int]:
        return step_timesteps(k, self.cfg.init_timestep)

    def groups(self) -> list[Group]:
        c = self.cfg
        common = optimizer_settings(c.optim, "sid")
        return [
            Group("critic", self.critic.params(), c.fake_lr, 1, **common),
            Group("generator", self._generator_params, c.generator_lr, 1, ema_decay=c.ema_decay, **common),
        ]

    # --- the student ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """k-step sampling: ``timesteps`` None (K steps), a step count k, or an explicit list of timesteps."""
        if timesteps is None:
            ts = self.student_timesteps
        elif isinstance(timesteps, int):
            ts = self.timesteps_for(timesteps)
        else:
            ts = [int(t) for t in timesteps]
        if generator is None:
            generator = torch.Generator(noise.device).manual_seed(0)
        return student.sample(self.generator, noise, cond, ts, generator, self.alphas_cumprod)

    def _student_sample(self, cond, n: int, k: int, generator, device) -> torch.Tensor:
        """k steps from pure noise, fresh noise between steps, gradient (where enabled) through the last step only."""
        ts = self.timesteps_for(k)
        x = randn((n, *self.sample_shape), generator, device)
        if k > 1:
            with torch.no_grad():
                x0 = student.sample(self.generator, x, cond, ts[:-1], generator, self.alphas_cumprod)
                x = student.renoise(x0, ts[-1], generator, self.alphas_cumprod)
        return self.generator(x, ts[-1], cond)

    def num_steps_at(self, step: int) -> int:
        """This iteration's k ~ U{1..K}: the same for both updates and on every rank."""
        return draw_num_steps(step, self.cfg.num_steps, self.seed)

    # --- losses -----------------------------------------------------------------------------------------------
    def _weight(self, x, x0_real, t) -> torch.Tensor:
        if self.cfg.weighting == "snr":
            return (1 + schedule.snr(self.alphas_cumprod, t)).rsqrt().float()
        return losses.mean_abs_weight(x, x0_real)

    def loss(self, group, batch, step, generator):
        cond = batch["cond"]
        n, device, acp = len(cond), self.alphas_cumprod.device, self.alphas_cumprod
        k = self.num_steps_at(step)
        if group == "generator":
            return self._generator_loss(batch, cond, n, k, generator, device, acp)
        if group == "critic":
            return self._critic_loss(batch, cond, n, k, generator, device, acp)
        raise KeyError(f"SiD has no parameter group {group!r}")

    def _generator_loss(self, batch, cond, n, k, generator, device, acp) -> dict[str, torch.Tensor]:
        plan, c = self.plan, self.cfg
        x = self._student_sample(cond, n, k, generator, device)
        t = randint(c.min_step, c.max_step, n, generator, device)
        x_t = schedule.add_noise(x, randn(x.shape, generator, device), t, acp)
        (y_r,) = guided(self.teacher, x_t, t, cond, (plan.real,), self.null_cond)
        y_f, y_f_alpha = guided(self.fake_score, x_t, t, cond, (plan.fake, plan.fake_alpha), self.null_cond)
        ok = _finite_rows(x, y_r, y_f, y_f_alpha)
        if not ok.all():  # the rows' NaN would come back through the score networks' backward: zero them
            if x_t.requires_grad:
                x_t.register_hook(lambda g: torch.where(_rows(ok, g), g, torch.zeros_like(g)))
            x, y_r, y_f, y_f_alpha = (
                torch.where(_rows(ok, v), v, torch.zeros_like(v)) for v in (x, y_r, y_f, y_f_alpha)
            )
        per_sample = losses.sid_loss(x, y_r, y_f, c.alpha, self._weight(x, y_r, t), y_f_alpha)
        terms = {"sid": torch.where(ok, per_sample, 0.0).sum() / ok.sum().clamp_min(1)}
        if self.critic.gan_on(batch):
            terms["gan_g"] = c.gan_generator_weight * self.critic.generator_loss(x, cond, generator)
        return terms

    def _drop_prompts(self, cond, n: int, generator, device):
        """``cond`` with a ``prompt_dropout`` share of its rows replaced by the empty prompt."""
        drop = (
            torch.rand(n, generator=generator, device=generator.device).to(device) < self.plan.prompt_dropout
        )
        return replace_rows(cond, self.null_cond(n), drop)

    def _critic_loss(self, batch, cond, n, k, generator, device, acp) -> dict[str, torch.Tensor]:
        plan, c = self.plan, self.cfg
        dropout = plan.prompt_dropout > 0
        if dropout and plan.sample_dropped:  # reference: the generator samples the dropped rows with ∅
            cond = self._drop_prompts(cond, n, generator, device)
        with torch.no_grad():
            x = self._student_sample(cond, n, k, generator, device)
        ok = _finite_rows(x)
        if not ok.any():  # nothing to learn from: a non-finite loss makes the trainer skip the update
            return {"fake_dsm": torch.full((), float("nan"), device=device)}
        if not ok.all():
            x, cond = x[ok], cond[ok]
        m = x.shape[0]
        t = randint(c.min_step, c.max_step, m, generator, device)
        eps = randn(x.shape, generator, device)
        x_t = schedule.add_noise(x, eps, t, acp)
        train_cond = cond
        if dropout and not plan.sample_dropped:  # fake_only: x was sampled with c, the fake sees ∅
            train_cond = self._drop_prompts(cond, m, generator, device)
        (pred,) = guided(self.fake_score, x_t, t, train_cond, (plan.fake_train,), self.null_cond, native=True)
        eps_hat = schedule.to_eps(pred, x_t.float(), t, acp, self.fake_score.prediction_type)
        err = losses.per_sample_mean((eps_hat - eps) ** 2)
        fine = torch.isfinite(err)
        terms = {"fake_dsm": torch.where(fine, err, 0.0).sum() / fine.sum().clamp_min(1)}
        if self.critic.gan_on(batch):
            d_loss = self.critic.discriminator_loss(x, batch["real"], cond, batch["cond"], generator)
            terms["gan_d"] = c.gan_critic_weight * d_loss
        return terms

    # --- export -----------------------------------------------------------------------------------------------
    def recipe(self, scheduler_config: dict) -> Recipe:
        """LCM-style sampling; a K-step generator samples at every k <= K on its k-step grid. The saved scheduler
        derives the K-step grid alone (LCM's own grid refuses more than K steps in plain diffusers); each k has a
        recipe with the scheduler that derives its grid (fastdiff.json's ``recipes``)."""
        ts, by_steps = self.student_timesteps, self.timesteps_by_steps
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "lcm")
        recipes = {}
        for k, grid in by_steps.items() if len(by_steps) > 1 else ():  # one generator for every k <= K
            k_name, k_kwargs, k_derivable = derive_scheduler(scheduler_config, grid, "lcm")
            recipes[k] = StepRecipe(k, 0.0, k_name, k_kwargs, timesteps=None if k_derivable else list(grid))
        return Recipe(self.name, len(ts), 0.0, ts, name, kwargs, derivable, "lcm", list(by_steps), recipes)

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> SiD:
        with_gan = gan_wanted("sid", ctx.config.gan, ctx.with_real_data)
        return cls.from_teacher(ctx.teacher, ctx.config, ctx.latent_shape, with_gan, seed=ctx.run.seed)

    @classmethod
    def from_teacher(cls, teacher, cfg: SiDConfig, latent_shape, with_gan: bool, seed: int = 0) -> SiD:
        """Generator and fake score as full UNet copies or LoRA adapters (shared-base: both on the teacher UNet)."""
        from ..models.heads import unet_discriminator_head

        generator, gen_params, fake, fake_params = student_and_fake(
            teacher, cfg.generator, cfg.fake_score, cfg.shared_base, cfg.lora_rank, cfg.lora_alpha, "sid"
        )
        real = teacher.denoiser(teacher.unet, adapter=None if cfg.shared_base else "*")
        head = unet_discriminator_head(teacher.unet, latent_shape) if with_gan else None
        return cls(
            generator,
            fake,
            real,
            cfg,
            latent_shape,
            gen_params,
            fake_params,
            teacher.unconditional(latent_shape),
            head,
            seed,
        )
