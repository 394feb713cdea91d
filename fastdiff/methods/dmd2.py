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

import torch
from torch import nn

from .. import schedule
from ..config import DMD2Config
from ..models.denoiser import CFG, Denoiser
from . import losses, student
from .base import Group, Method, optimizer_settings, randint, randn


class DMD2(Method):
    """DMD2 on any denoisers (UNets, LoRA adapters on a shared UNet, or the analytic test networks).

    Args:
        generator: the student, read as an x0 predictor at ``cfg.student_timesteps``.
        fake_score: the trainable score of the generator's distribution.
        real_score: the teacher's x0 prediction, CFG included (e.g. ``CFG(teacher, w, null_cond)``).
        cfg: the DMD2 section of the config.
        sample_shape: shape of one sample (C, H, W) or (D,).
        generator_params / fake_params: the trainable parameters of each network, by stable name.
        head: the discriminator head on the fake score's features, or None (no GAN term).
    """

    name = "dmd2"

    def __init__(
        self,
        generator: Denoiser,
        fake_score: Denoiser,
        real_score: nn.Module,
        cfg: DMD2Config,
        sample_shape: tuple[int, ...],
        generator_params: dict[str, nn.Parameter],
        fake_params: dict[str, nn.Parameter],
        head: nn.Module | None = None,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.generator, self.fake_score, self.real_score, self.head = generator, fake_score, real_score, head
        self.cfg = cfg
        self.sample_shape = tuple(sample_shape)
        self.student_timesteps = list(cfg.student_timesteps)
        self.num_train_timesteps = num_train_timesteps
        self._generator_params = generator_params
        self._critic_params = student.critic_params(fake_params, head)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.fake_score.alphas_cumprod

    def groups(self) -> list[Group]:
        c = self.cfg
        common = optimizer_settings(c, "dmd2")
        return [
            Group(
                "generator",
                self._generator_params,
                c.generator_lr,
                c.dfake_gen_update_ratio,
                ema_decay=c.ema_decay,
                **common,
            ),
            Group("critic", self._critic_params, c.fake_lr, 1, **common),
        ]

    # --- the student ------------------------------------------------------------------------------------------
    def _noise(self, n, generator, device):
        return randn((n, *self.sample_shape), generator, device)

    def _renoise(self, x0, t_next: int | torch.Tensor, generator):
        """Re-noise an x0 to the next student timestep with fresh, independent noise (never the previous ε)."""
        return student.renoise(x0, t_next, generator, self.alphas_cumprod)

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """Multi-step student sampling: x0 = G(x, t_i), then x <- α x0 + σ ε' at t_{i+1} (as LCMScheduler does)."""
        ts = list(timesteps or self.student_timesteps)
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
        x = self._noise(n, generator, device)
        if len(ts) > 1 and not self.cfg.backward_simulation:
            if real is None:
                raise ValueError("multi-step DMD2 without backward_simulation needs real images (a dataset)")
            x = schedule.add_noise(real, x, ts[k], self.alphas_cumprod)
        elif len(ts) > 1:
            with torch.no_grad():
                for i in range(int(k.max())):
                    x0 = self.generator(x, ts[i].expand(n), cond)
                    x = torch.where(
                        (k > i).view(-1, *[1] * (x.ndim - 1)), self._renoise(x0, ts[i + 1], generator), x
                    )
        return self.generator(x, ts[k], cond)

    # --- losses -----------------------------------------------------------------------------------------------
    def _logits(self, x, cond, generator):
        """GAN head on the fake score's features of x noised at t ~ U[0, T)."""
        return student.gan_logits(self.fake_score, self.head, x, cond, generator, self.num_train_timesteps)

    def _gan_on(self, batch) -> bool:
        return self.head is not None and batch.get("real") is not None

    def loss(self, group, batch, step, generator):
        cond, real = batch["cond"], batch.get("real")
        n = len(cond)
        device = self.alphas_cumprod.device
        acp = self.alphas_cumprod
        if group == "generator":
            x = self._student_sample(cond, n, generator, device, real)
            t = randint(self.cfg.min_step, self.cfg.max_step + 1, n, generator, device)
            x_t = schedule.add_noise(x.detach(), randn(x.shape, generator, device), t, acp)
            with torch.no_grad():
                x0_fake = self.fake_score(x_t, t, cond)
                x0_real = self.real_score(x_t, t, cond)
            terms = {"dm": losses.dmd_loss(x, x0_real, x0_fake)}
            if self._gan_on(batch):
                terms["gan_g"] = self.cfg.gan_generator_weight * losses.gan_generator_loss(
                    self._logits(x, cond, generator)
                )
            return terms
        if group == "critic":
            with torch.no_grad():
                x = self._student_sample(cond, n, generator, device, real)
            t = randint(0, self.num_train_timesteps, n, generator, device)
            eps = randn(x.shape, generator, device)
            x_t = schedule.add_noise(x, eps, t, acp)
            pred = self.fake_score.native(x_t, t, cond)
            target = schedule.target_for(self.fake_score.prediction_type, x, eps, t, acp)
            terms = {"fake_dsm": losses.denoising_loss(pred, target)}
            if self._gan_on(batch):
                d_loss = losses.gan_discriminator_loss(
                    self._logits(x, cond, generator), self._logits(real, cond, generator)
                )
                terms["gan_d"] = self.cfg.gan_critic_weight * d_loss
            return terms
        raise KeyError(f"DMD2 has no parameter group {group!r}")

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher, cfg: DMD2Config, latent_shape, with_gan: bool) -> DMD2:
        """Build generator / fake score as full UNet copies or LoRA adapters (shared-base: both on the teacher UNet)."""
        from ..models.heads import unet_discriminator_head
        from ..models.lora import student_and_fake

        generator, gen_params, fake, fake_params = student_and_fake(
            teacher, cfg.generator, cfg.fake_score, cfg.shared_base, cfg.lora_rank, cfg.lora_alpha, "dmd2"
        )
        real = CFG(
            teacher.denoiser(teacher.unet, adapter=None if cfg.shared_base else "*"),
            cfg.guidance_scale,
            teacher.null_cond,
        )
        head = unet_discriminator_head(teacher.unet, latent_shape) if with_gan else None
        return cls(generator, fake, real, cfg, latent_shape, gen_params, fake_params, head)
