"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024). Official code: tianweiy/DMD2.

Networks: generator G (x0 at fixed student timesteps), real score (frozen teacher with CFG w), fake score
(trainable, no CFG), and optionally a GAN head D on the fake score's mid-block features.

Generator (every ``dfake_gen_update_ratio``-th iteration, the two-time-scale rule):
    x = G(z) (backward simulation for multi-step), t ~ U[min_step, max_step], x_t = α_t x + σ_t ε
    g = (x̂_fake(x_t) - x̂_real(x_t)) / mean|x - x̂_real(x_t)|,   L_DM = 0.5 ||x - sg(x - g)||²
    + λ_G softplus(-D(x_t'))  with real images available
Critic (fake score + head, every iteration):
    denoising score matching on sg(x), t ~ U[0, T); + λ_D [softplus(D(fake_t)) + softplus(-D(real_t))]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import schedule
from ..config import OptimizerConfig, optim_field
from ..models.denoiser import CFG, Denoiser
from ..recipe import Recipe, derive_scheduler
from . import student
from .base import Group, RunContext, optimizer_settings, randint, randn
from .critic import CriticMethod, gan_wanted, student_and_fake
from .registry import register


@dataclass
class DMD2Config:
    """DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"); defaults are the SDXL reference."""

    guidance_scale: float = 8.0  # CFG w of the real score (SDXL 8, SD1.5 1.75)
    generator: str = "lora"  # lora | full
    fake_score: str = "lora"  # lora | full
    shared_base: bool = True  # generator and fake score as two adapters on the one frozen teacher UNet
    lora_rank: int = 64
    lora_alpha: int = 8
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    backward_simulation: bool = True  # multi-step: train on the student's own k-step outputs
    min_step: int = 20  # t ~ U[min_step, max_step] for the distribution-matching gradient
    max_step: int = 980
    generator_lr: float = 5e-5
    fake_lr: float = 5e-5
    dfake_gen_update_ratio: int = 5  # two-time-scale rule: generator updated once every N fake-score updates
    optim: OptimizerConfig = optim_field(weight_decay=0.01, warmup_steps=500, max_grad_norm=10.0)
    gan: str = "auto"  # auto (on when a dataset of real images is given) | on | off
    gan_generator_weight: float = 5e-3  # λ_G (SDXL 5e-3, SD1.5 1e-3)
    gan_critic_weight: float = 1e-2
    ema_decay: float | None = None  # the reference uses no EMA


@register
class DMD2(CriticMethod):
    """DMD2 on any denoisers (UNets, LoRA adapters on a shared UNet, or the analytic test networks).

    Args:
        generator: the student, read as an x0 predictor at ``cfg.student_timesteps``.
        fake_score: the trainable score of the generator's distribution (the shared ``Critic`` holds it).
        real_score: the teacher's x0 prediction, CFG included (e.g. ``CFG(teacher, w, null_cond)``).
        cfg: the DMD2 section of the config.
        sample_shape: shape of one sample (C, H, W) or (D,).
        generator_params / fake_params: the trainable parameters of each network, by stable name.
        head: the discriminator head on the fake score's features, or None (no GAN term).
    """

    name = "dmd2"
    config = DMD2Config

    def __init__(
        self, generator: Denoiser, fake_score: Denoiser, real_score: nn.Module, cfg: DMD2Config, *args, **kw
    ):
        super().__init__(generator, fake_score, cfg, *args, **kw)
        self.real_score = real_score
        self.student_timesteps = list(cfg.student_timesteps)

    def groups(self) -> list[Group]:
        c = self.cfg
        common = optimizer_settings(c.optim, "dmd2")
        return [
            Group(
                "generator",
                self._generator_params,
                c.generator_lr,
                c.dfake_gen_update_ratio,
                ema_decay=c.ema_decay,
                **common,
            ),
            Group("critic", self.critic.params(), c.fake_lr, 1, **common),
        ]

    # --- the student ------------------------------------------------------------------------------------------
    def timesteps_for(self, k: int) -> list[int]:
        """The k-step subset of the K student timesteps that LCMScheduler(original_inference_steps=K) samples."""
        ts = self.student_timesteps
        if not 1 <= k <= len(ts):
            raise ValueError(f"this DMD2 student samples at 1..{len(ts)} steps, not {k}")
        return [ts[i * len(ts) // k] for i in range(k)]

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """Multi-step student sampling: x0 = G(x, t_i), then x <- α x0 + σ ε' at t_{i+1} (as LCMScheduler does)."""
        ts = (
            self.timesteps_for(timesteps)
            if isinstance(timesteps, int)
            else list(timesteps or self.student_timesteps)
        )
        if generator is None:
            generator = torch.Generator(noise.device).manual_seed(0)
        return student.sample(self.generator, noise, cond, ts, generator, self.alphas_cumprod)

    def _student_sample(self, cond, n, generator, device, real=None):
        """One generator output per sample, with gradient through the last step only.

        Multi-step with backward simulation: draw k ~ U{0..K-1} per sample, run k student steps without gradient
        from pure noise (fresh noise between steps) and train the step at t_k on that input, so training sees what
        inference sees. Without backward simulation, inputs at t_k are noised real images.
        """
        ts = torch.tensor(self.student_timesteps, device=device)
        k = randint(0, len(ts), n, generator, device)
        x = randn((n, *self.sample_shape), generator, device)
        if len(ts) > 1 and not self.cfg.backward_simulation:
            if real is None:
                raise ValueError("multi-step DMD2 without backward_simulation needs real images (a dataset)")
            x = schedule.add_noise(real, x, ts[k], self.alphas_cumprod)
        elif len(ts) > 1:
            with torch.no_grad():
                for i in range(int(k.max())):
                    x0 = self.generator(x, ts[i].expand(n), cond)
                    renoised = student.renoise(x0, ts[i + 1], generator, self.alphas_cumprod)
                    x = torch.where((k > i).view(-1, *[1] * (x.ndim - 1)), renoised, x)
        return self.generator(x, ts[k], cond)

    # --- losses -----------------------------------------------------------------------------------------------
    def loss(self, group, batch, step, generator):
        cond, real = batch["cond"], batch.get("real")
        n, device, c = len(cond), self.alphas_cumprod.device, self.cfg
        if group == "generator":
            x = self._student_sample(cond, n, generator, device, real)
            terms = {"dm": self.critic.dmd_loss(x, self.real_score, cond, generator, c.min_step, c.max_step)}
            if self.critic.gan_on(batch):
                terms["gan_g"] = c.gan_generator_weight * self.critic.generator_loss(x, cond, generator)
            return terms
        if group == "critic":
            with torch.no_grad():
                x = self._student_sample(cond, n, generator, device, real)
            terms = {"fake_dsm": self.critic.denoising_loss(x, cond, generator)}
            if self.critic.gan_on(batch):
                d_loss = self.critic.discriminator_loss(x, real, cond, cond, generator)
                terms["gan_d"] = c.gan_critic_weight * d_loss
            return terms
        raise KeyError(f"DMD2 has no parameter group {group!r}")

    # --- export -----------------------------------------------------------------------------------------------
    def recipe(self, scheduler_config: dict) -> Recipe:
        """LCM-style sampling at the student timesteps; a K-step student also samples at any k <= K (LCM's subsets
        of its timesteps) when the scheduler derives them."""
        ts = self.student_timesteps
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "lcm")
        counts = list(range(1, len(ts) + 1)) if derivable and name == "LCMScheduler" else [len(ts)]
        return Recipe(self.name, len(ts), 0.0, ts, name, kwargs, derivable, "lcm", step_counts=counts)

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> DMD2:
        with_gan = gan_wanted("dmd2", ctx.config.gan, ctx.with_real_data)
        return cls.from_teacher(ctx.teacher, ctx.config, ctx.latent_shape, with_gan)

    @classmethod
    def from_teacher(cls, teacher, cfg: DMD2Config, latent_shape, with_gan: bool) -> DMD2:
        """Build generator / fake score as full UNet copies or LoRA adapters (shared-base: both on the teacher UNet)."""
        from ..models.heads import unet_discriminator_head

        generator, gen_params, fake, fake_params = student_and_fake(
            teacher, cfg.generator, cfg.fake_score, cfg.shared_base, cfg.lora_rank, cfg.lora_alpha, "dmd2"
        )
        real = CFG(
            teacher.denoiser(teacher.unet, adapter=None if cfg.shared_base else "*"),
            cfg.guidance_scale,
            teacher.unconditional(latent_shape),
        )
        head = unet_discriminator_head(teacher.unet, latent_shape) if with_gan else None
        return cls(generator, fake, real, cfg, latent_shape, gen_params, fake_params, head)
