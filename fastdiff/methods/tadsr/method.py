"""TAD-SR: one-step super-resolution by time-aware distillation (He et al. 2024, "One Step Diffusion-based
Super-Resolution with Time-Aware Distillation"), on a teacher of the SD x4 upscaler's shape
(``StableDiffusionUpscalePipeline``: 4 latent + 3 LR channels, the noise level as class label).

The student G is the teacher's UNet (a full copy, or a LoRA adapter on it) called once at t = T - 1 on the input
the pipeline feeds it, pure noise z (at the upscaler's ᾱ_999 = 0.0007 the paper's "LR latent + noise at the
largest t" differs from z by 2.6% of the LR latent), with the noised LR image concatenated as the teacher sees it.
Per item (``targets``: made before training) the teacher's multi-step output y from the same z and LR noise:

    x = G(z, T - 1, c)                                                    (x0, one step)
    L_reg = ||x - y||²                                                    regression to the teacher
    L_hsd = mean(sg(ε(x_s, s) - ε(y_s, s)) · x),  x_s = α_s x + σ_s n, y_s = α_s y + σ_s n, s ~ U[hsd_t]
    L_adv = -D(φ(x_t, t), t),                                              t ~ U[disc_t], fresh noise
    L_D   = relu(1 - D(φ(h_t, t), t)) + relu(1 + D(φ(sg(x)_t, t), t))      hinge; h = the HR image's latent

with ε the frozen teacher's noise prediction (conditioned on the same LR image), φ the frozen teacher UNet's
encoder features at every down block and the mid block, and D per-scale heads with the timestep as FiLM on their
GroupNorm (``fastdiff.models.heads.TimeAwareDiscriminator``). The student minimises
``regression_weight`` L_reg + ``hsd_weight`` L_hsd + ``adv_weight`` L_adv; EMA of its weights.

Differences from the reference code (ResShift teacher): the perturbation noise of the discriminator's inputs is
Gaussian (the reference draws it uniformly, which looks like a bug); the zero-initialised layer is the FiLM that
carries t (a zero-initialised spectrally normalised conv would divide by a zero singular value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import schedule
from ...config import OptimizerConfig, optim_field
from ...models.denoiser import encoder_features
from ...models.heads import TimeAwareDiscriminator, unet_encoder_channels
from ...recipe import Recipe, derive_scheduler
from .. import losses, student
from ..base import Group, Method, RunContext, optimizer_settings, randint, randn
from ..critic import network_base, score_network
from ..registry import register
from . import targets


@dataclass
class TADSRConfig:
    """TAD-SR's section; defaults follow the paper's Stable-Diffusion variant where it has one."""

    student: str = "full"  # full | lora
    shared_base: bool = False  # a LoRA student on the teacher's UNet (adapters disabled = the teacher)
    lora_rank: int = 64
    lora_alpha: int = 64
    noise_level: int | None = (
        None  # the upscaler's noise level (null: the teacher's, 20 for the SD x4 upscaler)
    )
    regression_weight: float = 1.0
    hsd_weight: float = 1.0
    adv_weight: float = 0.02  # the reference's generator weight on ResShift
    hsd_t: list[int] = field(default_factory=lambda: [20, 200])  # s ~ U[lo, hi]: a small noise level
    disc_t: list[int] = field(default_factory=lambda: [20, 880])  # the discriminator's t ~ U[lo, hi]
    disc_embed_dim: int = 128
    lr: float = 2e-5
    disc_lr: float = 2e-5
    ema_decay: float | None = 0.999
    # the teacher's multi-step outputs, made before training (resumable shards)
    targets: str | None = None  # the folder (null: <output_dir>/tadsr_targets)
    target_items: int = 1024
    target_steps: int = 20
    target_shard_size: int = 64
    target_batch_size: int = 16
    target_dtype: str = "float32"
    optim: OptimizerConfig = optim_field(weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0)


def check_config(c: TADSRConfig) -> None:
    if c.student not in ("full", "lora"):
        raise ValueError(f"tadsr.student must be 'full' or 'lora', got {c.student!r}")
    if c.shared_base and c.student != "lora":
        raise ValueError("tadsr.shared_base needs tadsr.student=lora (a full student is a copy of the UNet)")
    for key in ("hsd_t", "disc_t"):
        lo_hi = getattr(c, key)
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 999:
            raise ValueError(f"tadsr.{key} must be [lo, hi] with 0 <= lo <= hi <= 999, got {lo_hi}")
    for key in ("regression_weight", "hsd_weight", "adv_weight"):
        if getattr(c, key) < 0:
            raise ValueError(f"tadsr.{key} must be >= 0, got {getattr(c, key)}")


@register
class TADSR(Method):
    """TAD-SR on any x0-predicting student and teacher of an image-conditioned UNet.

    Args:
        net: the student (a UNet denoiser, full copy or LoRA adapter).
        teacher: the frozen teacher denoiser (adapters disabled in shared-base mode).
        discriminator: the time-aware heads (None when ``adv_weight`` is 0).
        cfg: the tadsr section.
        params: the student's trainable parameters by name.
        image_cond: ``image_cond(low_res, noise_level, noise) -> Cond``, the teacher's conditioning builder.
    """

    name = "tadsr"
    config = TADSRConfig
    own_data = True  # the bundled photographs when the run has no dataset

    def __init__(self, net, teacher, discriminator, cfg: TADSRConfig, params: dict, image_cond, noise_level):
        super().__init__()
        self.net, self.teacher, self.discriminator, self.cfg = net, teacher, discriminator, cfg
        self._params, self.image_cond, self.noise_level = params, image_cond, int(noise_level)
        self.last = len(net.alphas_cumprod) - 1

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.net.alphas_cumprod

    def groups(self) -> list[Group]:
        c = self.cfg
        out = [
            Group(
                "student", self._params, c.lr, ema_decay=c.ema_decay, **optimizer_settings(c.optim, "tadsr")
            )
        ]
        if self.discriminator is not None:
            heads = {n: p for n, p in self.discriminator.named_parameters()}
            out.append(Group("discriminator", heads, c.disc_lr, **optimizer_settings(c.optim, "tadsr")))
        return out

    # --- the student ----------------------------------------------------------------------------------------------
    def student_x0(self, noise: torch.Tensor, cond) -> torch.Tensor:
        return self.net(noise, torch.full((noise.shape[0],), self.last, device=noise.device), cond)

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """The one-step upscaler: x0 of the student at t = T - 1 from the pipeline's initial latents."""
        if timesteps not in (None, 1, [self.last]):
            raise ValueError(f"a TAD-SR student samples in one step (timestep {self.last}), not {timesteps}")
        return self.student_x0(noise, cond)

    # --- losses ---------------------------------------------------------------------------------------------------
    def teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        with torch.no_grad():
            x0 = self.teacher(x_t, t, cond)
        return schedule.eps_from_x0(x0, x_t, t, self.alphas_cumprod)

    def hsd_loss(self, x, target, cond, generator) -> torch.Tensor:
        """High-frequency score distillation: x and the target noised to s ~ U[hsd_t] with the same noise."""
        lo, hi = self.cfg.hsd_t
        s = randint(lo, hi + 1, x.shape[0], generator, x.device)
        n = randn(x.shape, generator, x.device)
        acp = self.alphas_cumprod
        eps_x = self.teacher_eps(schedule.add_noise(x.detach(), n, s, acp), s, cond)
        eps_y = self.teacher_eps(schedule.add_noise(target, n, s, acp), s, cond)
        return losses.score_distillation_loss(x, eps_x, eps_y)

    def logits(self, x, cond, generator) -> torch.Tensor:
        """D(φ(x_t, t), t) with t ~ U[disc_t] and Gaussian noise (gradients flow to x)."""
        lo, hi = self.cfg.disc_t
        t = randint(lo, hi + 1, x.shape[0], generator, x.device)
        x_t = schedule.add_noise(x, randn(x.shape, generator, x.device), t, self.alphas_cumprod)
        return self.discriminator(encoder_features(self.teacher, x_t, t, cond), t)

    def loss(self, group, batch, step, generator):
        c = self.cfg
        cond = self.image_cond(batch["low_res"], self.noise_level, noise=batch["low_res_noise"])
        if group == "discriminator":
            with torch.no_grad():
                fake = self.student_x0(batch["noise"], cond)
            return {
                "hinge": losses.hinge_discriminator_loss(
                    self.logits(fake, cond, generator), self.logits(batch["real"], cond, generator)
                )
            }
        if group != "student":
            raise KeyError(f"TAD-SR has no parameter group {group!r}")
        x = self.student_x0(batch["noise"], cond)
        terms = {"regression": c.regression_weight * (x.float() - batch["target"].float()).square().mean()}
        if c.hsd_weight:
            terms["hsd"] = c.hsd_weight * self.hsd_loss(x, batch["target"], cond, generator)
        if self.discriminator is not None:
            terms["adversarial"] = c.adv_weight * losses.hinge_generator_loss(self.logits(x, cond, generator))
        return terms

    # --- export ---------------------------------------------------------------------------------------------------
    def exported_student(self):
        return student.exported(self.net)

    def recipe(self, scheduler_config: dict) -> Recipe:
        """One step at t = T - 1 at the trained noise level: ``pipe(prompt="", image=lr, num_inference_steps=1,
        guidance_scale=0, noise_level=...)``."""
        ts = [self.last]
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "lcm")
        return Recipe(
            self.name, 1, 0.0, ts, name, kwargs, derivable, "lcm", step_counts=[1],
            call_extra={"noise_level": self.noise_level},
        )  # fmt: skip

    def model_card(self, recipe: dict, grid: str) -> str:
        from ...export import card_front_matter, lora_base_note, lora_ref, pipeline_ref, teacher_ref

        level, where = recipe["noise_level"], pipeline_ref(recipe)
        lora = ""
        if recipe.get("lora"):
            lora = f"""
## As a LoRA on the teacher

{lora_base_note(recipe)}

```python
from diffusers import StableDiffusionUpscalePipeline, {recipe["scheduler"]}

pipe = StableDiffusionUpscalePipeline.from_pretrained("{teacher_ref(recipe)}")  # the teacher
pipe.load_lora_weights({lora_ref(recipe)})  # or weight_name="kohya_lora.safetensors"
pipe.fuse_lora(lora_scale={recipe["lora_scale"]})
pipe.scheduler = {recipe["scheduler"]}.from_pretrained({where}, subfolder="scheduler")
```
"""
        return f"""{card_front_matter(recipe, ["super-resolution"])}# TAD-SR one-step x4 upscaler distilled from `{recipe["teacher"]}`

Distilled with fastdiff {recipe["fastdiff_version"]} (TAD-SR: regression to the teacher's multi-step output,
high-frequency score distillation, time-aware discriminator). One UNet call at t = {recipe["timesteps"][0]}; trained
at noise level {level}.

```python
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

pipe = StableDiffusionUpscalePipeline.from_pretrained({where})
low_res = Image.open("input.png").convert("RGB")
image = pipe(prompt="", image=low_res, num_inference_steps=1, guidance_scale=0.0, noise_level={level}).images[0]
```

or `fastdiff upscale . input.png --out output.png` (any size: tiles large inputs; grey and RGBA are converted).
{lora}
## Before / after

Held-out low-resolution patches (top, enlarged) and the student's output (bottom):

![before and after]({grid})
"""

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx: RunContext):
        """Make what is missing of the teacher's targets (resumable, split over ranks) and open them."""
        c = ctx.config
        check_config(c)
        teacher = ctx.teacher
        if not teacher.image_conditioned:
            raise ValueError(
                f"tadsr distils a super-resolution teacher (StableDiffusionUpscalePipeline); {teacher.path} is a "
                f"{teacher.family} text-to-image pipeline"
            )
        source = ctx.run.dataset or targets.BUNDLED
        plan = targets.make_plan(
            teacher,
            source,
            c.target_items,
            c.target_steps,
            c.noise_level if c.noise_level is not None else teacher.noise_level,
            ctx.resolution,
            ctx.run.seed,
            c.target_shard_size,
            c.target_batch_size,
            c.target_dtype,
        )
        folder = Path(c.targets or Path(ctx.run.output_dir) / "tadsr_targets")
        return targets.prepare_targets(
            folder, plan, teacher, ctx.dataset, ctx.rank, ctx.world_size, ctx.barrier
        )

    def batch_source(self, ctx: RunContext):
        """Items of the target folder in shuffled epochs (``data.sample_indices``), split over ranks."""
        from ...data import sample_indices

        store, run, device = ctx.prepared, ctx.run, ctx.teacher.device
        accum = run.gradient_accumulation_steps

        def batch_fn(step: int, micro: int, generator: torch.Generator) -> dict:
            idx = sample_indices(
                store.num_items,
                run.train_batch_size,
                step * accum + micro,
                run.seed,
                ctx.rank,
                ctx.world_size,
            )
            return {k: v.to(device) for k, v in store.items(idx).items()}

        return batch_fn

    @classmethod
    def build(cls, ctx: RunContext) -> TADSR:
        c, teacher = ctx.config, ctx.teacher
        check_config(c)
        if not teacher.image_conditioned:
            raise ValueError(
                f"tadsr needs a super-resolution teacher (StableDiffusionUpscalePipeline), got a {teacher.family} "
                "pipeline"
            )
        unet = network_base(teacher, c.student, c.shared_base)
        net, params = score_network(teacher, unet, c.student, "student", c.lora_rank, c.lora_alpha)
        frozen = teacher.denoiser(teacher.unet, adapter=None if c.shared_base else "*")
        disc = None
        if c.adv_weight > 0:
            disc = TimeAwareDiscriminator(unet_encoder_channels(teacher.unet), c.disc_embed_dim)
            disc.to(teacher.device)
        level = c.noise_level if c.noise_level is not None else teacher.noise_level
        return cls(net, frozen, disc, c, params, teacher.image_cond, level)
