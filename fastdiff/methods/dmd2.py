"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024). Official code: tianweiy/DMD2.

Networks: generator G (x0 at fixed student timesteps), real score (frozen teacher with CFG w), fake score
(trainable, no CFG), and optionally a GAN head D on the fake score's mid-block features.

Generator (every ``dfake_gen_update_ratio``-th iteration, the two-time-scale rule):
    x = G(z) (backward simulation for multi-step), t ~ U[min_step, max_step], x_t = α_t x + σ_t ε
    g = (x̂_fake(x_t) - x̂_real(x_t)) / mean|x - x̂_real(x_t)|,   L_DM = 0.5 ||x - sg(x - g)||²
    + λ_G softplus(-D(x_t'))  with real images available
Critic (fake score + head, every iteration):
    denoising score matching on sg(x), t ~ U[0, T); + λ_D [softplus(D(fake_t)) + softplus(-D(real_t))]

Regression initialisation (``init=regression``, the reference's SDXL 1-step recipe): a stage before training
generates N teacher ODE pairs (z, x_teacher(z, c)) (``fastdiff.methods.ode_pairs``: DDIM with CFG w, resumable
shards), and the generator's updates in the first ``regression_steps`` iterations minimise
    L_reg = ||G(z, t_0, c) - x_teacher||²  (latent MSE),  or  LPIPS(decode(G(z)), decode(x_teacher))
with the fake score trained as usual meanwhile; DMD takes over after. The reference instead pretrains the generator
in a separate run (10k pairs from a 50-step Euler sampler at CFG 8, LPIPS on tiny-VAE-decoded images, lr 1e-5,
batch 256 on 64 GPUs, 2,000 iterations) and starts DMD from it with a fresh fake score. Here one run holds both
phases: the regression updates run at ``regression_lr`` (a phase of the generator group's lr schedule) and at the
generator's interval.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import schedule
from ..config import OptimizerConfig, optim_field
from ..models.denoiser import CFG, Denoiser
from ..recipe import Recipe, derive_scheduler
from . import ode_pairs, student
from .base import Group, RunContext, optimizer_settings, randint, randn
from .critic import CriticMethod, gan_wanted, network_base, score_network, student_and_fake
from .registry import register

INITS = ("teacher", "regression")


@dataclass
class DMD2Config:
    """DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"); defaults are the SDXL reference."""

    guidance_scale: float = 8.0  # CFG w of the real score (SDXL 8, SD1.5 1.75)
    # Networks (critic.student_and_fake): each a LoRA adapter or a full float32 UNet copy; shared_base puts the
    # LoRA ones on the teacher's own frozen UNet. lora + lora + shared_base: one UNet in memory (memory-saving);
    # lora generator + full fake score + shared_base: the reference's LoRA layout, two UNets in memory.
    generator: str = "lora"  # lora | full
    fake_score: str = "lora"  # lora | full
    shared_base: bool = True  # LoRA networks sit on the teacher's UNet (adapters disabled = the teacher)
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
    # initialisation: "teacher" (the teacher's weights) or "regression" (then the first regression_steps iterations
    # regress G(z) onto the teacher's ODE pairs; module docstring)
    init: str = "teacher"  # teacher | regression
    regression_pairs: int = 0  # number of teacher ODE pairs (reference SDXL 1-step: 10,000)
    regression_steps: int = 0  # iterations of the regression phase (the generator updates at every ratio-th)
    regression_lr: float | None = None  # the generator's lr in the regression phase (None: generator_lr)
    regression_sampler_steps: int = 50  # the teacher's DDIM steps per pair (reference: 50 Euler, trailing)
    lpips_model: str | None = None  # local TorchScript LPIPS (file, or folder with lpips.pt); unset: MSE
    pairs: str | None = None  # pair shard folder; default <output_dir>/ode_pairs
    pair_shard_size: int = 64  # pairs per safetensors shard
    pair_batch_size: int = 8  # pairs sampled together
    pair_dtype: str = "float16"  # float32 | float16 | bfloat16 (stored noise and images)


def check_config(cfg: DMD2Config) -> None:
    """Refuse an unknown ``init`` and regression settings that cannot run or would do nothing."""
    if cfg.init not in INITS:
        raise ValueError(f"dmd2.init must be one of {list(INITS)}, got {cfg.init!r}")
    if cfg.init == "regression":
        for key in ("regression_pairs", "regression_steps", "regression_sampler_steps"):
            if getattr(cfg, key) < 1:
                raise ValueError(
                    f"dmd2.init=regression needs dmd2.{key} >= 1, got {getattr(cfg, key)} "
                    "(regression_pairs: how many teacher ODE pairs; regression_steps: iterations of the phase)"
                )
        return
    unused = [k for k in ("regression_pairs", "regression_steps", "regression_lr") if getattr(cfg, k)]
    unused += ["lpips_model"] if cfg.lpips_model else []
    if unused:
        raise ValueError(
            f"{', '.join('dmd2.' + k for k in unused)} only apply with dmd2.init=regression (init is {cfg.init!r})"
        )


def phase_multiplier(updates: int, factor: float, update: int) -> float:
    """``factor`` for a group's first ``updates`` updates (a phase with its own lr), 1 after."""
    return factor if update < updates else 1.0


@dataclass
class RegressionData:
    """What DMD2's stage before training hands to ``build``: the pairs and, where given, the LPIPS model."""

    pairs: ode_pairs.PairStore
    lpips: nn.Module | None = None

    def __str__(self) -> str:
        return str(self.pairs)


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
        regression: ``draw(n, generator, device) -> {"noise", "image", "cond"}``, teacher ODE pairs for the
            regression phase (``ode_pairs.pair_sampler``); None outside training runs.
        lpips: ``ode_pairs.LatentLPIPS`` for an LPIPS regression loss, or None (latent MSE).
    """

    name = "dmd2"
    config = DMD2Config

    def __init__(
        self,
        generator: Denoiser,
        fake_score: Denoiser,
        real_score: nn.Module,
        cfg: DMD2Config,
        *args,
        regression=None,
        lpips: nn.Module | None = None,
        **kw,
    ):
        super().__init__(generator, fake_score, cfg, *args, **kw)
        check_config(cfg)
        self.real_score = real_score
        self.student_timesteps = list(cfg.student_timesteps)
        self.regression, self.lpips = regression, lpips

    def groups(self) -> list[Group]:
        c = self.cfg
        common = optimizer_settings(c.optim, "dmd2")
        phase = None
        if c.regression_lr is not None:  # the regression phase's generator updates run at their own lr
            n = -(-c.regression_steps // c.dfake_gen_update_ratio)
            phase = functools.partial(phase_multiplier, n, c.regression_lr / c.generator_lr)
        return [
            Group(
                "generator",
                self._generator_params,
                c.generator_lr,
                c.dfake_gen_update_ratio,
                ema_decay=c.ema_decay,
                lr_multiplier=phase,
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
            steps = int(k.max())
            with torch.no_grad():
                for i in range(self.agree_max(steps)):  # sharded networks: as many calls as the busiest rank
                    x0 = self.generator(x, ts[i].expand(n), cond)
                    if i < steps:  # this rank's own steps (and random draws) are those of an unsharded run
                        renoised = student.renoise(x0, ts[i + 1], generator, self.alphas_cumprod)
                        x = torch.where((k > i).view(-1, *[1] * (x.ndim - 1)), renoised, x)
        return self.generator(x, ts[k], cond)

    # --- losses -----------------------------------------------------------------------------------------------
    def regression_loss(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """L_reg on n teacher ODE pairs: the student's first step from the pair's noise against the teacher's x0."""
        if self.regression is None:
            raise RuntimeError(
                "dmd2.init=regression: the regression phase needs the teacher ODE pairs (prepare)"
            )
        pairs = self.regression(n, generator, device)
        t0 = torch.full((n,), self.student_timesteps[0], device=device)
        x = self.generator(pairs["noise"], t0, pairs["cond"])
        return ode_pairs.regression_loss(x, pairs["image"], self.lpips)

    def loss(self, group, batch, step, generator):
        cond, real = batch["cond"], batch.get("real")
        n, device, c = len(cond), self.alphas_cumprod.device, self.cfg
        if group == "generator" and step < c.regression_steps:
            return {"regression": self.regression_loss(n, generator, device)}
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

    # --- the stage before training: the teacher's ODE pairs -----------------------------------------------------
    @classmethod
    def prepare(cls, ctx: RunContext) -> RegressionData | None:
        """``init=regression``: generate what is missing of the teacher ODE pairs (resumable, split over ranks) and
        load the LPIPS model if one is given (first: a missing file fails before the long stage)."""
        c = ctx.config
        check_config(c)
        if c.init != "regression":
            return None
        lpips = ode_pairs.load_lpips(c.lpips_model) if c.lpips_model else None
        if not ctx.prompts:
            raise ValueError(
                "dmd2.init=regression samples the teacher for its pairs and needs prompts: set `prompts=<file>`"
            )
        plan = ode_pairs.make_plan(
            ctx.teacher,
            ctx.prompts,
            c.regression_pairs,
            c.regression_sampler_steps,
            c.guidance_scale,
            ctx.resolution,
            ctx.run.seed,
            c.pair_shard_size,
            c.pair_batch_size,
            c.pair_dtype,
        )
        folder = Path(c.pairs or Path(ctx.run.output_dir) / "ode_pairs")
        pairs = ode_pairs.prepare_pairs(folder, plan, ctx.teacher, ctx.rank, ctx.world_size, ctx.barrier)
        return RegressionData(pairs, lpips)

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> DMD2:
        with_gan = gan_wanted("dmd2", ctx.config.gan, ctx.with_real_data)
        regression = lpips = None
        if ctx.prepared is not None:  # training with init=regression (an export rebuilds without the pairs)
            encode = functools.partial(ctx.teacher.encode, resolution=ctx.resolution)
            regression = ode_pairs.pair_sampler(ctx.prepared.pairs, encode)
            if ctx.prepared.lpips is not None:
                lpips = ode_pairs.LatentLPIPS(ctx.prepared.lpips, ctx.teacher.vae)
        return cls.from_teacher(ctx.teacher, ctx.config, ctx.latent_shape, with_gan, regression, lpips)

    @classmethod
    def from_teacher(
        cls,
        teacher,
        cfg: DMD2Config,
        latent_shape,
        with_gan: bool,
        regression=None,
        lpips=None,
        adapters: tuple[str, str] = ("student", "fake"),
        generator=None,
        section: str = "dmd2",
    ) -> DMD2:
        """Build generator / fake score as full UNet copies or LoRA adapters named ``adapters``
        (``critic.student_and_fake``). ``generator``: a ``(denoiser, params)`` pair to train instead of a network
        initialised from the teacher (e.g. a smaller UNet); the fake score is then built alone."""
        from ..models.heads import unet_discriminator_head

        if generator is None:
            generator, gen_params, fake, fake_params = student_and_fake(
                teacher, cfg.generator, cfg.fake_score, cfg.shared_base, cfg.lora_rank, cfg.lora_alpha, section,
                adapters,
            )  # fmt: skip
        else:
            generator, gen_params = generator
            unet = network_base(teacher, cfg.fake_score, cfg.shared_base)
            fake, fake_params = score_network(
                teacher, unet, cfg.fake_score, adapters[1], cfg.lora_rank, cfg.lora_alpha
            )
        real = CFG(
            teacher.denoiser(teacher.unet, adapter=None if cfg.shared_base else "*"),
            cfg.guidance_scale,
            teacher.unconditional(latent_shape),
        )
        head = unet_discriminator_head(teacher.unet, latent_shape) if with_gan else None
        networks = (generator, fake, real, cfg, latent_shape, gen_params, fake_params, head)
        return cls(*networks, regression=regression, lpips=lpips)
