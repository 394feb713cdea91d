"""AGD: adapter guidance distillation (Jensen & Sadat 2025, "Efficient Distillation of Classifier-Free Guidance
using Adapters"). Official code: cristianpjensen/agd.

Data (teacher side, before training; stored by ``fastdiff.methods.agd.trajectories``): for each prompt c draw w ~ U[w_min, w_max]
and, with probability p_neg, a negative prompt n (else n = ∅, the unconditional input); run the teacher with CFG w on
a diffusers scheduler, keeping every step:
    x ~ N(0, σ_init² I);  for t in scheduler.timesteps:
        x_in = scale_model_input(x, t)
        ε_w  = ε(x_in, t, n) + w (ε(x_in, t, c) - ε(x_in, t, n))          the CFG-combined prediction
        record (x_in, t, w, c, n, ε_w);   x = step(ε_w, t, x)
ε is the teacher's native output (eps, v or x0): CFG is affine, so combining native outputs equals combining eps.
Training on these guided trajectories (not on noised data) matches what the guided sampler visits.

Training: the base UNet is frozen; guidance adapters A (``fastdiff.models.adapters``) after every cross-attention
read tokens for w, t, the prompt and the negative prompt:
    L = || ε_A(x_in, t, c; w, n) - ε_w ||²                  AdamW, lr 1e-4, cosine, 5k steps (reference defaults)
Sampling: the same scheduler loop with ε_A, one UNet forward per step (``pipelines/adapter_guidance.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import OptimizerConfig, optim_field
from ...models.adapters import GuidanceAdapters
from ...models.denoiser import Denoiser, cat_conds
from ...recipe import Recipe, make_scheduler
from ..base import Group, Method, RunContext, optimizer_settings
from ..registry import register


@dataclass
class AGDConfig:
    """AGD, adapter guidance distillation (Jensen & Sadat 2025); defaults: the card and the reference
    (cristianpjensen/agd): w ~ U[1, 12], AdamW lr 1e-4, cosine with 10% warm-up, 5k steps."""

    # trajectories: the teacher with CFG w on a diffusers scheduler, every step stored (fastdiff.methods.agd.trajectories)
    trajectories: str | None = None  # shard folder; default <output_dir>/trajectories
    w_min: float = 1.0  # w ~ U[w_min, w_max] per trajectory
    w_max: float = 12.0
    num_trajectories: int | None = None  # default: one per prompt
    num_inference_steps: int = 50  # teacher steps per trajectory (reference: ~1000); also the export's
    scheduler: str | None = None  # diffusers scheduler class; default: the teacher's own
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {timestep_spacing: trailing}
    negative_prompt_prob: float = 0.0  # chance that a trajectory's CFG guides away from a negative prompt
    negative_prompts: str | None = None  # .txt/.jsonl of negative prompts; default: other training prompts
    shard_size: int = 64  # trajectories per safetensors shard
    trajectory_batch_size: int = 8  # trajectories sampled together
    trajectory_dtype: str = "float16"  # float32 | float16 | bfloat16 (stored x_t and targets)
    # adapters (fastdiff.models.adapters)
    hidden_dim: int = 320
    num_heads: int = 1
    mlp_ratio: float = 1.0
    use_timestep: bool = True
    use_prompt: bool = True
    use_negative_prompt: bool = True
    gate_by_w: bool = True  # residuals scaled by (w - 1): w = 1 is exactly the conditional model
    adapter_seed: int = 0  # seed of the fixed Fourier features
    # training
    lr: float = 1.0e-4
    optim: OptimizerConfig = optim_field(warmup_steps=500, lr_schedule="cosine", max_grad_norm=1.0)
    ema_decay: float | None = None
    # export: the recipe recorded in fastdiff.json (any w in [w_min, w_max] and any scheduler work)
    guidance_scale: float = 5.0  # recommended w (SDXL 5-8, SD1.5 7.5, tiny teachers 1-2)


# --- the teacher's guided trajectories (pure given the networks) -----------------------------------------------
def fresh(scheduler):
    """A new scheduler of the same class and config (schedulers keep a step index: one per sampling run)."""
    return type(scheduler).from_config(scheduler.config)


def step_kwargs(scheduler, generator=None) -> dict:
    """The extra ``step`` arguments diffusers' pipelines pass: eta=0 and the generator, where accepted."""
    params = set(inspect.signature(scheduler.step).parameters)
    out = {}
    if "eta" in params:
        out["eta"] = 0.0
    if "generator" in params:
        out["generator"] = generator
    return out


def _per_sample(w, n: int, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, device=like.device, dtype=torch.float32).reshape(-1)
    return (w.expand(n) if w.numel() == 1 else w).view(-1, *[1] * (like.ndim - 1))


@torch.no_grad()
def cfg_trajectory(
    native: Callable,
    scheduler,
    noise: torch.Tensor,
    cond,
    uncond,
    w,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Sample with CFG on ``scheduler`` and record every step (one batch; w and uncond per sample).

    Args:
        native: the teacher's raw output ``native(x_t, t, cond)`` (a Denoiser's ``native``).
        scheduler: a fresh diffusers scheduler (it is stepped here).
        noise: [n, ...] standard normal noise (scaled by ``init_noise_sigma`` here, as diffusers' pipelines do).
        cond / uncond: the conditions of the two branches (``Cond`` or label tensors); ``uncond`` per sample (the
            unconditional input or a negative prompt).
        w: the guidance scale, a number or one per sample.
        num_inference_steps: scheduler steps.
        generator: for stochastic schedulers.

    Returns:
        ``x_t`` [n, S, ...] (the UNet inputs), ``t`` [S], ``target`` [n, S, ...] (the CFG-combined predictions),
        ``sample`` [n, ...] (the final state).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    n = noise.shape[0]
    x = noise * scheduler.init_noise_sigma
    wv = _per_sample(w, n, noise)
    both = cat_conds([uncond, cond])
    extra = step_kwargs(scheduler, generator)
    xs, ts, targets = [], [], []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        pred = native(torch.cat([x_in, x_in]), t.expand(2 * n), both).float()
        eps_uncond, eps_cond = pred.chunk(2)
        guided = eps_uncond + wv * (eps_cond - eps_uncond)
        xs.append(x_in.float())
        ts.append(t.float())
        targets.append(guided)
        x = scheduler.step(guided.to(x.dtype), t, x, **extra, return_dict=False)[0]
    return {
        "x_t": torch.stack(xs, 1),
        "t": torch.stack(ts),
        "target": torch.stack(targets, 1),
        "sample": x,
    }


# --- the method ------------------------------------------------------------------------------------------------
@register
class AGD(Method):
    """Adapter guidance distillation on a frozen base denoiser (a UNet, or any network with diffusers
    cross-attention blocks) with ``GuidanceAdapters`` attached to it.

    Args:
        student: the base denoiser; its network carries ``adapters`` (attached), so ``student.native`` is guided.
        adapters: the guidance adapters (the only trainable parameters).
        cfg: the AGD section of the config.
        sample_shape: shape of one sample (C, H, W) or (D,).
        scheduler: the diffusers scheduler of ``generate`` (a template; each run uses a fresh copy).
        null_cond: ``null_cond(n)``: the unconditional input (what a missing negative prompt means).
        negative_tokens: maps a negative condition to the adapters' negative tokens [n, L, D] (default: a
            ``Cond``'s prompt embeddings).
    """

    name = "agd"
    config = AGDConfig

    def __init__(
        self,
        student: Denoiser,
        adapters: GuidanceAdapters,
        cfg: AGDConfig,
        sample_shape: tuple[int, ...],
        scheduler,
        null_cond: Callable[[int], object],
        negative_tokens: Callable[[object], torch.Tensor] | None = None,
    ):
        super().__init__()
        if not adapters.is_attached:
            raise ValueError("attach the guidance adapters to the student's network before building AGD")
        self.student, self.adapters, self.cfg = student, adapters, cfg
        self.sample_shape = tuple(sample_shape)
        self.scheduler, self.null_cond = scheduler, null_cond
        self.negative_tokens = negative_tokens or (lambda c: c.prompt_embeds)
        self.guidance_scale = float(cfg.guidance_scale)
        self.num_inference_steps = int(cfg.num_inference_steps)
        self.trajectory_seconds: float | None = None  # the trajectory stage's wall time, for the export

    @property
    def student_timesteps(self) -> list[int]:
        """The scheduler's timesteps at the recommended step count (what the export records)."""
        s = fresh(self.scheduler)
        s.set_timesteps(self.num_inference_steps)
        return [int(t) if float(t).is_integer() else float(t) for t in s.timesteps.tolist()]

    def groups(self) -> list[Group]:
        c = self.cfg
        params = {n: p for n, p in self.adapters.named_parameters()}
        return [Group("adapters", params, c.lr, ema_decay=c.ema_decay, **optimizer_settings(c.optim, "agd"))]

    def guided(self, x_t, t, cond, w, negative=None) -> torch.Tensor:
        """One forward of the adapter-guided network: its native prediction at guidance scale w (number or [n]),
        with ``negative`` as the negative condition (None: the unconditional input)."""
        n = x_t.shape[0]
        negative = self.null_cond(n) if negative is None else negative
        with self.adapters.guidance(w, self.negative_tokens(negative)):
            return self.student.native(x_t, torch.as_tensor(t, device=x_t.device).expand(n), cond)

    def loss(self, group, batch, step, generator):
        if group != "adapters":
            raise KeyError(f"AGD has no parameter group {group!r}")
        pred = self.guided(batch["x_t"], batch["t"], batch["cond"], batch["w"], batch.get("negative"))
        return {"mse": F.mse_loss(pred.float(), batch["target"].float())}

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None, guidance_scale=None, negative=None):
        """The adapter-guided sampler: the scheduler loop of a diffusers pipeline, one forward per step.

        ``timesteps``: a step count (default: ``agd.num_inference_steps``); ``guidance_scale`` defaults to the
        recommended ``agd.guidance_scale``.
        """
        steps = timesteps if isinstance(timesteps, int) else self.num_inference_steps
        if timesteps is not None and not isinstance(timesteps, int):
            steps = len(timesteps)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        sched = fresh(self.scheduler)
        sched.set_timesteps(steps, device=noise.device)
        x = noise * sched.init_noise_sigma
        extra = step_kwargs(sched, generator)
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            pred = self.guided(x_in, t, cond, w, negative)
            x = sched.step(pred.to(x.dtype), t, x, **extra, return_dict=False)[0]
        return x

    # --- stages: the teacher's trajectories, then batches from them ------------------------------------------
    @classmethod
    def prepare(cls, ctx: RunContext):
        """Stage 1: the teacher's CFG trajectories (resumable, split over ranks), before the adapters attach."""
        import time

        from .trajectories import prepare

        start = time.perf_counter()
        store = prepare(ctx.run, ctx.teacher, ctx.resolution, ctx.rank, ctx.world_size, ctx.barrier)
        store.seconds = time.perf_counter() - start
        return store

    def batch_source(self, ctx: RunContext):
        from .trajectories import trajectory_batch_fn

        self.trajectory_seconds = ctx.prepared.seconds
        return trajectory_batch_fn(
            ctx.run, ctx.teacher, ctx.prepared, ctx.resolution, ctx.rank, ctx.world_size
        )

    # --- export: the teacher plus the adapters as one adapter-guidance pipeline -----------------------------------
    def recipe(self, scheduler_config: dict) -> Recipe:
        """Any diffusers scheduler and step count (the adapters replace CFG, not the sampler), any w in range."""
        c = self.cfg
        scheduler = type(self.scheduler).__name__
        adapters = sum(p.numel() for p in self.adapters.parameters())
        unet = sum(p.numel() for p in self.student.unet.parameters())
        extra = {
            "nfe_per_step": 1,
            "w_range": [c.w_min, c.w_max],
            "pipeline_file": "pipeline/adapter_guidance.py",
            "adapters": {
                "parameters": adapters,
                "unet_parameters": unet,
                "fraction_of_unet": adapters / unet,
            },
            "trajectory_seconds": self.trajectory_seconds,
        }
        return Recipe(
            self.name,
            self.num_inference_steps,
            self.guidance_scale,
            self.student_timesteps,
            scheduler,
            dict(c.scheduler_kwargs),
            sampler="scheduler",
            step_counts=None,
            extra=extra,
        )

    def export_pipeline(self, teacher):
        from .export import build_pipeline

        return build_pipeline(self, teacher)

    def model_card(self, recipe: dict, grid: str) -> str:
        from .export import model_card

        return model_card(recipe, grid)

    # --- construction from a diffusers teacher ----------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> AGD:
        return cls.from_teacher(ctx.teacher, ctx.config, ctx.latent_shape)

    @classmethod
    def from_teacher(cls, teacher, cfg: AGDConfig, latent_shape) -> AGD:
        """Adapters for every cross-attention block of the teacher's UNet, attached to it (base frozen)."""
        check_config(cfg)
        adapters = adapters_for(teacher.unet, cfg, num_train_timesteps=len(teacher.alphas_cumprod))
        adapters.to(teacher.device).attach(teacher.unet)
        scheduler = make_scheduler(teacher.pipeline.scheduler, cfg.scheduler, cfg.scheduler_kwargs)
        return cls(
            teacher.denoiser(teacher.unet),
            adapters,
            cfg,
            latent_shape,
            scheduler,
            teacher.unconditional(latent_shape),
        )


def adapters_for(model: nn.Module, cfg: AGDConfig, num_train_timesteps: int = 1000) -> GuidanceAdapters:
    """The adapter set the config describes, for ``model``'s cross-attention blocks."""
    return GuidanceAdapters.for_model(
        model,
        hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        use_timestep=cfg.use_timestep,
        use_prompt=cfg.use_prompt,
        use_negative_prompt=cfg.use_negative_prompt,
        num_train_timesteps=num_train_timesteps,
        w_min=cfg.w_min,
        w_max=cfg.w_max,
        gate_by_w=cfg.gate_by_w,
        seed=cfg.adapter_seed,
    )


def check_config(cfg: AGDConfig) -> None:
    """Clear errors for AGD settings that cannot work."""
    if not cfg.w_min <= cfg.w_max:
        raise ValueError(f"agd.w_min ({cfg.w_min}) must not exceed agd.w_max ({cfg.w_max})")
    if cfg.w_min < 0:
        raise ValueError(f"agd.w_min must be >= 0, got {cfg.w_min}")
    if cfg.num_inference_steps < 1:
        raise ValueError(f"agd.num_inference_steps must be >= 1, got {cfg.num_inference_steps}")
    if not 0.0 <= cfg.negative_prompt_prob <= 1.0:
        raise ValueError(f"agd.negative_prompt_prob must be in [0, 1], got {cfg.negative_prompt_prob}")
    if cfg.negative_prompt_prob > 0 and not cfg.use_negative_prompt:
        raise ValueError("agd.negative_prompt_prob > 0 needs agd.use_negative_prompt=true")
    for key in ("hidden_dim", "num_heads", "shard_size", "trajectory_batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"agd.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_trajectories is not None and cfg.num_trajectories < 1:
        raise ValueError(f"agd.num_trajectories must be >= 1, got {cfg.num_trajectories}")
    if cfg.trajectory_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"agd.trajectory_dtype must be float32, float16 or bfloat16, got {cfg.trajectory_dtype!r}"
        )
    optimizer_settings(cfg.optim, "agd")  # checks lr_schedule before the trajectory stage
