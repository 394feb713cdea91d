"""YONOS-SR: scale distillation for one-step super-resolution (Noroozi et al. 2023, "You Only Need One Step: Fast
Super-Resolution with Stable Diffusion via Scale Distillation"), paper only: rebuilt from the paper on a teacher of
the SD x4 upscaler's shape (``StableDiffusionUpscalePipeline``: 4 latent + 3 LR channels, noise level as class label).

Stage 1, scale distillation (group ``student``). A teacher T₂ trained at x2 (an easier problem: it sees 4x the
input pixels) gives the targets of an x4 student S (a copy of the x4 teacher's UNet, or a LoRA on it). For an HR
crop h with latent z₀ = E(h), LR images l₄ = down₄(h) and l₂ = down₂(h):

    t ~ U[t_range],  ε ~ N(0, I),  z_t = α_t z₀ + σ_t ε                    (the same z_t for both)
    x̂_S = S(z_t, t, c₄)      c₄: l₄ as the x4 pipeline feeds it (low_res_scheduler noise at its noise level)
    x̂_T = T₂(z_t, t, c₂)     c₂: l₂ likewise at T₂'s noise level, space-to-depth (pixel_unshuffle 2: 12 channels)
    y   = sg(x̂_T)  (target: teacher) | z₀ (ground_truth: the x4 model trained directly) | (1 - w) sg(x̂_T) + w z₀ (mix)
    L   = ||P(x̂_S) - P(y)||²,  P(x) = the student's native parametrisation of x at z_t (x0, ε or v)

so ``target: ground_truth`` is exactly the x4 teacher's own training loss, everything else equal. The paper chains
scales (x2 → x4 → x8 ...); this implements the one step [2, 4] and refuses longer chains.

Stage 2, decoder fine-tune (group ``decoder``, the last ``decoder_steps`` iterations; ``student`` stops there). The
distilled UNet works in one DDIM step, so it is frozen and the VAE decoder D (encoder frozen) is fine-tuned on its
one-step outputs: x̂ = S(z, T - 1, c₄) with z ~ N(0, I) as the pipeline draws it, L = |D(x̂) - h|₁ (+ a VGG
perceptual term when ``perceptual_weights`` names a local file).

Export: a standard ``StableDiffusionUpscalePipeline`` (student UNet, and the tuned VAE after stage 2) whose saved
DDIM scheduler samples one step at t = 999; the student stays a diffusion model, so more DDIM steps also run.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import schedule
from ...config import ConfigError, OptimizerConfig, optim_field
from ...models.denoiser import Cond, UNetDenoiser
from ...recipe import Recipe, derive_scheduler
from .. import student
from ..base import Group, Method, RunContext, optimizer_settings, randint, randn
from ..critic import network_base, score_network
from ..ode_pairs import ode_sample
from ..registry import register

logger = logging.getLogger("fastdiff")

TARGETS = ("teacher", "ground_truth", "mix")


@dataclass
class YONOSConfig:
    """YONOS-SR's section (paper only; the paper gives no training hyper-parameters for our scale: ours are stated)."""

    # the chain: the teacher's scale, then the student's
    scales: list[int] = field(default_factory=lambda: [2, 4])
    # the teacher of each scale but the last (a scale-teacher folder: fastdiff.sr.teacher.load_scale_teacher)
    scale_teachers: list[str] = field(default_factory=lambda: ["assets/teachers/sr-x2"])
    target: str = "teacher"  # teacher | ground_truth (the x4 model trained directly) | mix
    gt_weight: float = 0.5  # target=mix: y = (1 - gt_weight) teacher + gt_weight ground truth
    student: str = "full"  # full | lora
    shared_base: bool = False  # a LoRA student on the teacher's UNet
    lora_rank: int = 64
    lora_alpha: int = 64
    noise_level: int | None = None  # the x4 student's noise level (null: the teacher's)
    t_range: list[int] = field(default_factory=lambda: [0, 999])  # t ~ U[lo, hi]
    lr: float = 5e-5
    # of the student; must be null with a decoder stage (the decoder is tuned on the raw weights)
    ema_decay: float | None = None
    # the last N iterations fine-tune the VAE decoder on the frozen one-step UNet's outputs
    decoder_steps: int = 0
    decoder_lr: float = 1e-4
    # a local VGG16 state dict (torchvision's layout, ``features.N.*``) for a perceptual term; null: L1 only
    perceptual_weights: str | None = None
    perceptual_weight: float = 0.1
    optim: OptimizerConfig = optim_field(weight_decay=0.0, warmup_steps=0, max_grad_norm=1.0)


def check_config(c: YONOSConfig, max_steps: int | None = None) -> None:
    if c.target not in TARGETS:
        raise ConfigError(f"yonos.target must be one of {', '.join(TARGETS)}, got {c.target!r}")
    if c.student not in ("full", "lora"):
        raise ConfigError(f"yonos.student must be 'full' or 'lora', got {c.student!r}")
    if c.shared_base and c.student != "lora":
        raise ConfigError("yonos.shared_base needs yonos.student=lora (a full student is a copy of the UNet)")
    if not 0 <= c.gt_weight <= 1:
        raise ConfigError(f"yonos.gt_weight must be in [0, 1], got {c.gt_weight}")
    if len(c.t_range) != 2 or not 0 <= c.t_range[0] <= c.t_range[1] <= 999:
        raise ConfigError(f"yonos.t_range must be [lo, hi] with 0 <= lo <= hi <= 999, got {c.t_range}")
    scales = list(c.scales)
    if scales != [2, 4]:
        raise ConfigError(
            f"yonos.scales={scales}: only the step [2, 4] (an x2 teacher, an x4 student) is implemented; a longer "
            "chain is not"
        )
    if len(c.scale_teachers) != len(scales) - 1:
        raise ConfigError(
            f"yonos.scale_teachers needs one teacher folder per scale but the last ({scales[:-1]}), got "
            f"{len(c.scale_teachers)}"
        )
    if c.decoder_steps < 0:
        raise ConfigError(f"yonos.decoder_steps must be >= 0, got {c.decoder_steps}")
    if c.decoder_steps and max_steps is not None and c.decoder_steps >= max_steps:
        raise ConfigError(
            f"yonos.decoder_steps={c.decoder_steps} leaves no scale-distillation steps of max_steps={max_steps}"
        )
    if c.decoder_steps and c.ema_decay:
        raise ConfigError(
            "yonos.ema_decay with a decoder stage: the decoder is tuned on the UNet's raw weights, the export would "
            "carry the EMA ones; set yonos.ema_decay=null"
        )
    if c.decoder_steps and c.student != "full":
        raise ConfigError(
            "yonos.decoder_steps > 0 needs yonos.student=full (the export carries UNet and VAE)"
        )


def _before(stop: int, step: int) -> bool:
    return step < stop


def _from(start: int, step: int) -> bool:
    return step >= start


def prediction_space(x0, x_t, t, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """x0 at x_t read in a network's native parametrisation (x0, ε or v)."""
    eps = schedule.eps_from_x0(x0, x_t, t, alphas_cumprod)
    return schedule.target_for(prediction_type, x0, eps, t, alphas_cumprod)


@register
class YONOS(Method):
    """YONOS-SR scale distillation (and the decoder fine-tune) on any x0-reading student and scale teacher.

    Args:
        net: the x4 student (a UNet denoiser, full copy or LoRA adapter).
        scale_teacher: the frozen x2 teacher as a denoiser (its UNet reads ``scale_cond``'s conditioning).
        vae: a float32 copy of the teacher's VAE whose decoder stage 2 tunes (None: no decoder stage).
        cfg: the yonos section.
        params: the student's trainable parameters by name.
        image_cond: ``image_cond(low_res, noise_level, noise) -> Cond``, the x4 teacher's conditioning builder.
        scale_cond: ``scale_cond(low_res_x2, noise) -> Cond``, the scale teacher's.
        noise_level: the x4 student's noise level.
        max_steps: the run's iterations (stage 2 is the last ``cfg.decoder_steps`` of them).
        perceptual: a frozen feature network for stage 2's perceptual term (None: L1 only).
    """

    name = "yonos"
    config = YONOSConfig
    own_data = True  # the bundled photographs when the run has no dataset

    def __init__(self, net, scale_teacher, vae, cfg: YONOSConfig, params: dict, image_cond, scale_cond,
                 noise_level: int, max_steps: int, perceptual=None):  # fmt: skip
        super().__init__()
        self.net, self.scale_teacher, self.vae, self.cfg = net, scale_teacher, vae, cfg
        self._params, self.image_cond, self.scale_cond = params, image_cond, scale_cond
        self.noise_level, self.max_steps, self.perceptual = int(noise_level), int(max_steps), perceptual
        self.last = len(net.alphas_cumprod) - 1
        self.stage1_steps = self.max_steps - cfg.decoder_steps
        # the teacher's VAE, unregistered (``decoder_tuned`` compares with it; ``build`` sets it)
        self.__dict__["base_vae"] = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.net.alphas_cumprod

    def groups(self) -> list[Group]:
        c = self.cfg
        settings = optimizer_settings(c.optim, "yonos")
        if not c.decoder_steps:
            return [Group("student", self._params, c.lr, ema_decay=c.ema_decay, **settings)]
        decoder = {f"decoder.{n}": p for n, p in self.vae.decoder.named_parameters()}
        decoder |= {f"post_quant_conv.{n}": p for n, p in self.vae.post_quant_conv.named_parameters()}
        return [
            Group("student", self._params, c.lr, active=functools.partial(_before, self.stage1_steps), **settings),
            Group("decoder", decoder, c.decoder_lr, active=functools.partial(_from, self.stage1_steps), **settings),
        ]  # fmt: skip

    # --- the student ----------------------------------------------------------------------------------------------
    def student_x0(self, noise: torch.Tensor, cond) -> torch.Tensor:
        """One DDIM step from t = T - 1: the student's x0 (what the exported pipeline's single step returns)."""
        return self.net(noise, torch.full((noise.shape[0],), self.last, device=noise.device), cond)

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        """Deterministic DDIM on trailing timesteps from the pipeline's initial latents: one step by default (the
        recipe); a step count runs the student as the diffusion model it still is."""
        if timesteps in (None, 1, [self.last]):
            return self.student_x0(noise, cond)
        if not isinstance(timesteps, int):
            raise ValueError(
                f"a YONOS student samples on DDIM's trailing grid: pass a step count, not {timesteps}"
            )
        return ode_sample(self.net, noise, cond, timesteps, self.alphas_cumprod)

    # --- losses ---------------------------------------------------------------------------------------------------
    def target_x0(self, batch: dict, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """y: the scale teacher's x0 at the same z_t (no gradient), the ground truth z₀, or their mix."""
        c = self.cfg
        if c.target == "ground_truth":
            return batch["latents"]
        with torch.no_grad():
            teacher = self.scale_teacher(
                z_t, t, self.scale_cond(batch["low_res_x2"], batch["low_res_x2_noise"])
            )
        if c.target == "teacher":
            return teacher
        return (1 - c.gt_weight) * teacher + c.gt_weight * batch["latents"]

    def distill_loss(self, batch: dict) -> torch.Tensor:
        """Stage 1: ||P(S(z_t, t, c₄)) - P(y)||² in the student's native parametrisation."""
        z0, t, eps = batch["latents"], batch["timesteps"], batch["noise"]
        z_t = schedule.add_noise(z0, eps, t, self.alphas_cumprod)
        cond = self.image_cond(batch["low_res"], self.noise_level, noise=batch["low_res_noise"])
        x = self.net(z_t, t, cond)
        y = self.target_x0(batch, z_t, t)
        ptype, acp = self.net.prediction_type, self.alphas_cumprod
        pred = prediction_space(x.float(), z_t.float(), t, acp, ptype)
        target = prediction_space(y.float(), z_t.float(), t, acp, ptype)
        return (pred - target).square().mean()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The (tuned) VAE decoder: scaled latents -> images in [-1, 1] (unclamped, gradients flow)."""
        vae = self.vae  # the decoder trains in float32 while the frozen encoder may be in half precision
        dtype = vae.post_quant_conv.weight.dtype
        return vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample.float()

    def decoder_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stage 2: L1 (+ perceptual) of the tuned decoder's image of the frozen one-step UNet's latents."""
        cond = self.image_cond(batch["low_res"], self.noise_level, noise=batch["low_res_noise"])
        with torch.no_grad():
            x = self.student_x0(batch["noise"], cond)
        image, hr = self.decode(x), batch["hr"].float()
        terms = {"l1": (image - hr).abs().mean()}
        if self.perceptual is not None:
            terms["perceptual"] = self.cfg.perceptual_weight * self.perceptual(image, hr)
        return terms

    def loss(self, group, batch, step, generator):
        if group == "student":
            return {"distill": self.distill_loss(batch)}
        if group == "decoder":
            return self.decoder_loss(batch)
        raise KeyError(f"YONOS-SR has no parameter group {group!r}")

    # --- export ---------------------------------------------------------------------------------------------------
    def exported_student(self):
        return student.exported(self.net)

    def decoder_tuned(self) -> bool:
        """Whether the decoder differs from the teacher's (a checkpoint before the decoder stage: not yet)."""
        if self.vae is None or self.base_vae is None:
            return False
        base = dict(self.base_vae.named_parameters())
        return any(not torch.equal(p.detach().float().cpu(), base[n].detach().float().cpu())
                   for n, p in self.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))  # fmt: skip

    def recipe(self, scheduler_config: dict) -> Recipe:
        """One deterministic DDIM step at t = T - 1 at the trained noise level: ``pipe(prompt="", image=lr,
        num_inference_steps=1, guidance_scale=0, noise_level=...)``; other step counts run DDIM (trailing)."""
        ts = [self.last]
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "ddim")
        extra = {"scales": list(self.cfg.scales), "target": self.cfg.target,
                 "decoder_tuned": self.decoder_tuned()}  # fmt: skip
        return Recipe(
            self.name, 1, 0.0, ts, name, kwargs, derivable, "ddim", step_counts=None, extra=extra,
            call_extra={"noise_level": self.noise_level},
        )  # fmt: skip

    def export_pipeline(self, teacher):
        """With a tuned decoder: the teacher's pipeline with the student UNet, the tuned VAE and the recipe's
        scheduler (None otherwise: the standard export)."""
        if self.vae is None:
            return None
        from diffusers import DiffusionPipeline

        from ...recipe import make_scheduler

        pipe = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
        pipe.unet.load_state_dict({k: v.float() for k, v in self.net.unet.state_dict().items()})
        pipe.vae.load_state_dict({k: v.float() for k, v in self.vae.state_dict().items()})
        recipe = self.recipe(dict(pipe.scheduler.config))
        pipe.scheduler = make_scheduler(pipe.scheduler.config, recipe.scheduler, recipe.scheduler_kwargs)
        return pipe

    def model_card(self, recipe: dict, grid: str) -> str:
        from ...export import card_front_matter, pipeline_ref

        level, where = recipe["noise_level"], pipeline_ref(recipe)
        target = {"teacher": "the x2 teacher's prediction at the same noisy latent (scale distillation)",
                  "ground_truth": "the ground truth (trained directly at x4, the baseline)",
                  "mix": "a mix of the x2 teacher's prediction and the ground truth"}[recipe.get("target", "teacher")]  # fmt: skip
        decoder = (
            "The UNet was then frozen and the VAE decoder fine-tuned on its one-step outputs (the exported VAE)."
            if recipe.get("decoder_tuned")
            else "The VAE is the teacher's."
        )
        return f"""{card_front_matter(recipe, ["super-resolution"])}# YONOS-SR one-step x4 upscaler distilled from `{recipe["teacher"]}`

Distilled with fastdiff {recipe["fastdiff_version"]} (YONOS-SR, scales {recipe.get("scales")}).
The x4 student's target at every noise level was {target}.
{decoder}
One deterministic DDIM step at t = {recipe["timesteps"][0]}; trained at noise level {level}.

```python
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

pipe = StableDiffusionUpscalePipeline.from_pretrained({where})
low_res = Image.open("input.png").convert("RGB")
image = pipe(prompt="", image=low_res, num_inference_steps=1, guidance_scale=0.0, noise_level={level}).images[0]
```

or `fastdiff upscale . input.png --out output.png` (any size: tiles large inputs). The saved scheduler is DDIM with
trailing spacing: more steps (`num_inference_steps=4`) also run.

## Before / after

Held-out low-resolution patches (top, enlarged) and the student's output (bottom):

![before and after]({grid})
"""

    # --- data -----------------------------------------------------------------------------------------------------
    def batch_source(self, ctx: RunContext):
        """HR crops (the bundled photographs' train split, or the run's dataset in shuffled epochs) with every draw
        of a step made here: latents z₀ (a VAE posterior sample), t, ε, and the LR images at each scale with the
        upscaler's conditioning noise. A pure function of (seed, step, micro)."""
        from ...sr.data import random_pairs

        run, teacher, device = ctx.run, ctx.teacher, ctx.teacher.device
        accum, n = run.gradient_accumulation_steps, run.train_batch_size
        lo, hi = self.cfg.t_range
        scales = tuple(self.cfg.scales)

        def batch_fn(step: int, micro: int, generator: torch.Generator) -> dict:
            if ctx.dataset is None:
                hr = random_pairs(n, generator, "train", ctx.resolution).hr
            else:
                from ...data import sample_indices

                idx = sample_indices(
                    len(ctx.dataset), n, step * accum + micro, run.seed, ctx.rank, ctx.world_size
                )
                hr = torch.stack([ctx.dataset[i]["pixel_values"] for i in idx]).float()
            return make_batch(hr, generator, teacher.encode_images, scales, (lo, hi), device)

        return batch_fn

    # --- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> YONOS:
        c, teacher = ctx.config, ctx.teacher
        check_config(c, ctx.run.max_steps)
        if not teacher.image_conditioned:
            raise ValueError(
                f"yonos needs a super-resolution teacher (StableDiffusionUpscalePipeline), got a {teacher.family} "
                "pipeline"
            )
        scale_teacher = load_scale_denoiser(c.scale_teachers[0], teacher, c.scales)
        unet = network_base(teacher, c.student, c.shared_base)
        net, params = score_network(teacher, unet, c.student, "student", c.lora_rank, c.lora_alpha)
        vae = None
        if c.decoder_steps:
            vae = copy.deepcopy(teacher.vae).float().to(teacher.device)
            vae.requires_grad_(False)
        perceptual = None
        if c.decoder_steps and c.perceptual_weights:
            from .perceptual import VGGPerceptual

            perceptual = VGGPerceptual.from_file(c.perceptual_weights).to(teacher.device)
        level = c.noise_level if c.noise_level is not None else teacher.noise_level
        method = cls(net, scale_teacher.denoiser, vae, c, params, teacher.image_cond, scale_teacher.cond, level,
                     ctx.run.max_steps, perceptual)  # fmt: skip
        method.__dict__["base_vae"] = teacher.vae
        return method


def make_batch(
    hr, generator, encode, scales=(2, 4), t_range=(0, 999), device="cpu"
) -> dict[str, torch.Tensor]:
    """One stage-1/2 batch from HR images ``[n, 3, S, S]`` in [-1, 1]: ``latents`` z₀ = ``encode(hr, generator)``,
    ``timesteps`` t ~ U[t_range], ``noise`` ε, ``low_res`` (x4) and ``low_res_x2`` (the teacher's scale) with
    their conditioning noises, and ``hr``; every draw from ``generator`` in a fixed order."""
    from ...sr.data import scale_pairs

    hr = hr.to(device)
    lows = scale_pairs(hr.float(), tuple(scales))
    student_scale, teacher_scale = scales[-1], scales[0]
    n = hr.shape[0]
    z0 = encode(hr, generator).float()
    return {
        "hr": hr,
        "latents": z0,
        "timesteps": randint(t_range[0], t_range[1] + 1, n, generator, z0.device),
        "noise": randn(z0.shape, generator, z0.device),
        "low_res": lows[student_scale],
        "low_res_noise": randn(lows[student_scale].shape, generator, z0.device),
        "low_res_x2": lows[teacher_scale],
        "low_res_x2_noise": randn(lows[teacher_scale].shape, generator, z0.device),
    }


@dataclass
class ScaleDenoiser:
    """A scale teacher as the method reads it: an x0 denoiser and its conditioning builder."""

    denoiser: torch.nn.Module
    cond: object


def load_scale_denoiser(folder: str, teacher, scales) -> ScaleDenoiser:
    """Load the scale teacher ``folder`` (``fastdiff.sr.teacher.load_scale_teacher``) for the x4 ``teacher`` and
    check that it speaks the same latents: its scale is ``scales[0]``, its schedule the teacher's, its VAE the
    teacher's (a warning otherwise: its predictions would be in another latent space)."""
    from ...recipe import teacher_folder
    from ...sr.teacher import load_scale_teacher

    try:
        path = teacher_folder(folder)
    except FileNotFoundError:
        raise ConfigError(
            f"yonos.scale_teachers: {folder!r} is not a folder; train the x2 teacher with `python "
            f"train/sr_teacher.py --config assets/configs/teacher_sr_x2.yaml --scale 2 --out {folder}`"
        ) from None
    st = load_scale_teacher(path, dtype=teacher.dtype)
    if st.scale != scales[0]:
        raise ConfigError(f"yonos.scales starts at x{scales[0]}, but {folder} is an x{st.scale} teacher")
    if st.unet.config.out_channels != teacher.unet.config.out_channels:
        raise ConfigError(f"{folder} predicts {st.unet.config.out_channels} latent channels, the teacher "
                          f"{teacher.unet.config.out_channels}")  # fmt: skip
    acp = st.scheduler.alphas_cumprod.float()
    if acp.shape != teacher.alphas_cumprod.shape or not torch.allclose(
        acp, teacher.alphas_cumprod, atol=1e-6
    ):
        raise ConfigError(f"{folder} was trained on another noise schedule than the teacher {teacher.path}: its "
                          "predictions at the student's z_t would be at other noise levels")  # fmt: skip
    _check_same_vae(st.base, teacher, folder)
    st.unet.to(teacher.device)
    denoiser = UNetDenoiser(st.unet, teacher.alphas_cumprod, st.prediction_type)
    low_res_scheduler = teacher.pipeline.low_res_scheduler

    def cond(low_res: torch.Tensor, noise: torch.Tensor) -> Cond:
        n = low_res.shape[0]
        level = torch.full((n,), st.noise_level, dtype=torch.long, device=teacher.device)
        image = low_res_scheduler.add_noise(
            low_res.to(teacher.device).float(), noise.to(teacher.device), level
        )
        return Cond(teacher.encode([""] * n).prompt_embeds, image=st.condition(image), class_labels=level)

    return ScaleDenoiser(denoiser, cond)


def _check_same_vae(base: Path, teacher, folder: str) -> None:
    from safetensors.torch import load_file

    files = sorted((Path(base) / "vae").glob("*.safetensors"))
    ours = {k: v.float().cpu() for k, v in teacher.vae.state_dict().items()}
    same = bool(files)
    if files:
        theirs = load_file(str(files[0]))
        same = theirs.keys() == ours.keys() and all(
            theirs[k].shape == ours[k].shape and torch.allclose(theirs[k].float(), ours[k], atol=1e-3)
            for k in ours
        )
    if not same:
        logger.warning("the scale teacher %s was trained on the latents of %s/vae, not those of the teacher %s: "
                       "its targets are in another latent space", folder, base, teacher.path)  # fmt: skip
