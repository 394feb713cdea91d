"""BOOT: data-free distillation by bootstrapping (Gu et al. 2023, "BOOT: Data-free Distillation of Denoising Diffusion
Models with Bootstrapping"). No official code exists; this follows the paper, with the choices it leaves open stated.

The student g(ε, t) sees only the initial noise ε (and the prompt) and predicts the *signal* of the teacher's ODE
trajectory that starts at ε: y_t = (x_t - σ_t ε) / α_t. y_T is the teacher's x0 prediction at pure noise, y_0 the
trajectory's final sample, so g(ε, 0) is a one-step generator. One DDIM step of the teacher f (CFG w baked in) is
exact in signal space, which gives the bootstrap target from t to the next grid time s < t:

    x̂_t = α_t sg(y_t) + σ_t ε,   D = 1 - (α_t σ_s) / (σ_t α_s) = 1 - exp(λ_t - λ_s),  λ = log(α / σ)
    L_BS = (1 / D²) ||g(ε, s) - sg[y_t + D (f(x̂_t, t) - y_t)]||²,     y_t = g(ε, t)
    L_B  = ||g(ε, T) - f(ε, T)||²    (the boundary: the trajectory starts at the teacher's prediction from ε)

with L = L_BS + ``boundary_weight`` L_B, prompts only, EMA of the student.

Choices (the paper leaves them open): trajectory times on a grid of ``grid_size`` timesteps from T - 1 to 0, evenly
spaced in λ (so D is the same for every pair), bootstrapping between neighbours; the student is the teacher's UNet
(full copy, or a LoRA adapter on it) read as a signal predictor *at the noise level of its input*, which is always
pure noise: g(ε, t) = x0-read of UNet(ε, T - 1 - t) with α_{T-1}, σ_{T-1}. The reversed timestep input makes the
one-step generator g(ε, 0) the UNet at timestep T - 1 read as the teacher reads it there, i.e. a standard one-step
pipeline at t = 999 (and at initialisation it is the teacher's own one-step prediction); the boundary g(ε, T) sits
at timestep input 0 and is fitted by L_B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedule
from ..config import OptimizerConfig, optim_field
from ..models.denoiser import CFG
from ..recipe import Recipe, derive_scheduler
from . import student
from .base import Group, Method, RunContext, optimizer_settings, randint, randn
from .critic import network_base, score_network
from .registry import register


@dataclass
class BOOTConfig:
    """BOOT's section; defaults are an SDXL setting (the paper has no SDXL run)."""

    guidance_scale: float = 8.0  # CFG w of the teacher, baked into the target
    student: str = "lora"  # lora | full
    shared_base: bool = True  # a LoRA student sits on the teacher's UNet (adapters disabled = the teacher)
    lora_rank: int = 64
    lora_alpha: int = 8
    grid_size: int = 32  # trajectory times from T - 1 to 0, evenly spaced in log-SNR
    boundary_weight: float = 0.1
    lr: float = 1e-5
    ema_decay: float | None = 0.9999
    optim: OptimizerConfig = optim_field(weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0)


def lambda_grid(alphas_cumprod: torch.Tensor, size: int) -> list[int]:
    """``size`` timesteps from T - 1 down to 0, evenly spaced in λ = log(α / σ) (each the nearest integer timestep;
    where λ moves faster than that near t = 0, consecutive timesteps instead), strictly decreasing."""
    if not 2 <= size <= len(alphas_cumprod):
        raise ValueError(f"boot.grid_size must be in [2, {len(alphas_cumprod)}], got {size}")
    lam = 0.5 * (alphas_cumprod / (1 - alphas_cumprod)).log()
    targets = torch.linspace(float(lam[-1]), float(lam[0]), size)
    grid = [int((lam - v).abs().argmin()) for v in targets]
    grid[-1] = 0
    for i in range(size - 2, -1, -1):
        grid[i] = max(grid[i], grid[i + 1] + 1)
    return grid


@register
class BOOT(Method):
    """BOOT on any denoisers (a UNet, a LoRA adapter on the teacher's, or the analytic test networks).

    Args:
        net: the student network (a Denoiser; its ``native`` output read at the pure-noise level).
        teacher: the teacher's x0 prediction with CFG (e.g. ``CFG(teacher, w, null_cond)``).
        cfg: the boot section.
        sample_shape: shape of one sample.
        params: the student's trainable parameters by name.
    """

    name = "boot"
    config = BOOTConfig

    def __init__(self, net, teacher, cfg: BOOTConfig, sample_shape, params: dict):
        super().__init__()
        self.net, self.teacher, self.cfg, self.sample_shape = net, teacher, cfg, tuple(sample_shape)
        self._params = params
        self.last = len(net.alphas_cumprod) - 1  # T - 1: the noise level of every input
        self.grid = lambda_grid(net.alphas_cumprod.cpu(), cfg.grid_size)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.net.alphas_cumprod

    def groups(self) -> list[Group]:
        c = self.cfg
        return [
            Group("student", self._params, c.lr, ema_decay=c.ema_decay, **optimizer_settings(c.optim, "boot"))
        ]

    # --- the student --------------------------------------------------------------------------------------------
    def signal(self, noise: torch.Tensor, t, cond) -> torch.Tensor:
        """g(ε, t): the student's signal y_t of the teacher trajectory from ``noise`` (t an int or a [n] tensor)."""
        n = noise.shape[0]
        t = torch.as_tensor(t, device=noise.device).long().expand(n)
        native = self.net.native(noise, self.last - t, cond)
        level = torch.full_like(t, self.last)
        return schedule.to_x0(native, noise, level, self.alphas_cumprod, self.net.prediction_type)

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """The one-step generator g(ε, 0)."""
        if timesteps not in (None, 1, [self.last]):
            raise ValueError(f"a BOOT student samples in one step (timestep {self.last}), not {timesteps}")
        return self.signal(noise, 0, cond)

    # --- losses -------------------------------------------------------------------------------------------------
    def bootstrap_target(self, y_t, noise, t, s, cond):
        """sg[y_t + D (f(x̂_t, t) - y_t)] and D, with x̂_t = α_t y_t + σ_t ε: one teacher DDIM step in signal space."""
        acp = self.alphas_cumprod
        a_t, s_t = schedule.alpha_sigma(acp, t, y_t)
        a_s, s_s = schedule.alpha_sigma(acp, s, y_t)
        d = 1 - (a_t * s_s) / (s_t * a_s)
        with torch.no_grad():
            f = self.teacher(a_t * y_t + s_t * noise, t, cond)
        return y_t + d * (f - y_t), d

    def bootstrap_loss(self, noise: torch.Tensor, pair: torch.Tensor, cond) -> torch.Tensor:
        """L_BS for each sample's grid pair (t, s) = (grid[pair], grid[pair + 1])."""
        grid = torch.tensor(self.grid, device=noise.device)
        t, s = grid[pair], grid[pair + 1]
        with torch.no_grad():
            y_t = self.signal(noise, t, cond)
        target, d = self.bootstrap_target(y_t, noise, t, s, cond)
        per_sample = (self.signal(noise, s, cond) - target).square().flatten(1).mean(1)
        return (per_sample / d.flatten(1)[:, 0].square()).mean()

    def boundary_loss(self, noise: torch.Tensor, cond) -> torch.Tensor:
        """L_B = ||g(ε, T) - f(ε, T)||²."""
        top = torch.full((noise.shape[0],), self.last, device=noise.device)
        with torch.no_grad():
            start = self.teacher(noise, top, cond)
        return (self.signal(noise, self.last, cond) - start).square().mean()

    def loss(self, group, batch, step, generator):
        if group != "student":
            raise KeyError(f"BOOT has no parameter group {group!r}")
        cond = batch["cond"]
        n, device = len(cond), self.alphas_cumprod.device
        noise = randn((n, *self.sample_shape), generator, device)
        pair = randint(0, len(self.grid) - 1, n, generator, device)
        return {
            "bootstrap": self.bootstrap_loss(noise, pair, cond),
            "boundary": self.cfg.boundary_weight * self.boundary_loss(noise, cond),
        }

    # --- export -------------------------------------------------------------------------------------------------
    def exported_student(self):
        return student.exported(self.net)

    def recipe(self, scheduler_config: dict) -> Recipe:
        """One step at t = T - 1: the pipeline's UNet call there is g(ε, 0), read as the teacher reads it."""
        ts = [self.last]
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "lcm")
        return Recipe(self.name, 1, 0.0, ts, name, kwargs, derivable, "lcm", step_counts=[1])

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> BOOT:
        c, teacher = ctx.config, ctx.teacher
        if c.student not in ("lora", "full"):
            raise ValueError(f"boot.student must be 'lora' or 'full', got {c.student!r}")
        if c.shared_base and c.student != "lora":
            raise ValueError(
                "boot.shared_base needs boot.student=lora (a full student is a copy of the UNet)"
            )
        unet = network_base(teacher, c.student, c.shared_base)
        net, params = score_network(teacher, unet, c.student, "student", c.lora_rank, c.lora_alpha)
        real = CFG(
            teacher.denoiser(teacher.unet, adapter=None if c.shared_base else "*"),
            c.guidance_scale,
            teacher.unconditional(ctx.latent_shape),
        )
        return cls(net, real, c, ctx.latent_shape, params)
