"""The bundled SR teacher: a small ``StableDiffusionUpscalePipeline`` (SD x4 upscaler shape) trained from scratch.

``python train/sr_teacher.py --config assets/configs/teacher_sr.yaml --out DIR`` trains, offline on CPU, on the
bundled photographs' train split (``fastdiff.sr.data``: 64x64 HR crops, LR = ``downscale(HR)``, 16x16) and writes a
standard pipeline folder that plain diffusers loads and runs as::

    pipe = StableDiffusionUpscalePipeline.from_pretrained(DIR)
    pipe(prompt="", image=lr_pil, num_inference_steps=20, guidance_scale=0, noise_level=NOISE_LEVEL)

(``NOISE_LEVEL`` is ``noise_level`` of the recipe, stored in ``fastdiff_teacher.json``; 20, the pipeline's default).
Two trained stages, both seeded and resumable (a batch is a pure function of (seed, stage, step), so a checkpoint is
weights + EMA + optimizer + step):

1. VAE: an ``AutoencoderKL`` with three blocks (4x down, 4 latent channels) on HR crops: MSE + small KL. The
   pipeline insists on ``scaling_factor`` 0.08333, so after training the latent space is rescaled exactly (the mean
   rows of ``quant_conv`` times c, its log-variance biases plus 2 log c, ``post_quant_conv``'s input weights over c)
   so that 0.08333 x latents have unit standard deviation, as in the real upscaler.
2. UNet: ``UNet2DConditionModel`` with in_channels 7 (4 latents + 3 LR channels) and the noise level as class label
   (``num_class_embeds`` 1000), trained exactly as the pipeline samples: the LR image is noised in pixel space by
   ``low_res_scheduler.add_noise`` at ``noise_level`` and concatenated to the noised latents (same 16x16 size);
   latents = 0.08333 x a VAE posterior sample of the HR crop; v-prediction on the real upscaler's betas
   (scaled_linear 0.0001-0.02, 1000 steps); cross-attention to the frozen tiny CLIP text encoder's embedding of the
   empty prompt (the teacher is conditioned on ""). AdamW, warm-up + cosine, EMA (the EMA is what is saved).

The saved scheduler is ``DDIMScheduler`` with ``timestep_spacing="trailing"`` (20 steps start at t=999).

``scale=2`` (``--scale 2``) trains YONOS-SR's x2 teacher instead: the same networks, conditioned on the x2 image
space-to-depth (``space_to_depth``: 12 channels at the latent grid); with ``init_from`` an x4 teacher folder it
reuses that teacher's VAE and text encoder (referenced, not copied) and starts from its UNet (``widen_conv_in``).
Its folder is not a pipeline (see ``save_scale_teacher``, ``load_scale_teacher``, ``evaluate_scale_teacher``).
``evaluate(folder)`` measures the teacher at 20 steps and bicubic on the held-out grid (``grid_pairs("heldout")``),
PSNR-Y (per image, per patch, pooled) and SSIM-Y; the ship rule: ship only if the teacher's per-image PSNR-Y beats
bicubic's (``ship`` in the result).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..teacher_training import folder_mb, load_recipe, lr_scale, num_params
from .data import (
    PATCH_SIZE,
    SCALE,
    bicubic_upscale,
    downscale,
    from_pil,
    grid_pairs,
    random_pairs,
    space_to_depth,
    to_pil,
)
from .metrics import psnr, psnr_y, rgb_to_y, ssim_y

STATE_DIR = "_train_state"  # checkpoints inside the output folder; removed when the run completes
VAE_SCALING = 0.08333  # what StableDiffusionUpscalePipeline insists on
MAX_NOISE_LEVEL = 350  # the pipeline's max_noise_level (the real upscaler's)
RESERVE_MINUTES = 3.0  # of SRTeacherConfig.max_minutes, kept for saving and evaluation
TRAIN_COMMAND = "python train/sr_teacher.py --config assets/configs/teacher_sr.yaml"


# ------------------------------------------------------------------------------------------------- config


@dataclass
class StageConfig:
    """Optimisation of one stage (AdamW, linear warm-up then cosine to ``lr_floor`` x lr)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_floor: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    ema_decay: float | None = None  # EMA of the weights (what is saved); null: the raw weights
    checkpoint_minutes: float = 5.0
    log_every: int = 50  # steps between loss records


@dataclass
class VAEConfig(StageConfig):
    """Stage 1: the autoencoder (64x64 RGB <-> 4x16x16 latents with three blocks)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    kl_weight: float = 1e-6  # times the KL summed over latent elements, per image
    # side of the HR crops it trains on (null: the recipe's patch_size); the VAE is convolutional, so smaller crops
    # train it faster per step
    patch_size: int | None = None
    # random | resampler: start as a box-down / linear-up resampler that training adds to (init_as_resampler)
    init: str = "random"
    # weight of ||posterior mean[:3] - LR||²: latents whose first 3 channels are the LR image (the UNet then mostly
    # copies its conditioning and generates the 4th channel)
    align_weight: float = 0.0


@dataclass
class TextConfig:
    """The frozen random-init CLIP text encoder (it only ever encodes the empty prompt)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 1
    num_attention_heads: int = 2


@dataclass
class UNetConfig(StageConfig):
    """Stage 2: the 7-channel UNet on 16x16 latents and its training."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])  # 16x16, 8x8, 4x4
    cross_attention: list[bool] = field(default_factory=lambda: [False, False, True])  # per level
    attention_heads: list[int] = field(default_factory=lambda: [2, 4, 4])  # diffusers' `attention_head_dim`
    layers_per_block: int = 2
    norm_num_groups: int = 32
    noise_level_max: int | None = (
        None  # null: always the recipe's noise_level; else uniform in [0, max] (SD x4)
    )
    # v_prediction (the real upscaler's) | sample (x0): what the UNet predicts (the saved scheduler says so)
    prediction_type: str = "v_prediction"
    # random | copy: start as a copy of the LR conditioning into latent channels 0-2 (init_unet_as_copy; needs
    # prediction_type sample and a VAE trained with align_weight)
    init: str = "random"


@dataclass
class SRTeacherConfig:
    """Everything ``train/sr_teacher.py`` needs; ``key=value`` overrides reach sections (``unet.steps=300``)."""

    seed: int = 0
    num_threads: int = 1
    # the magnification: 4, the pipeline teacher (LR concatenated at the latent grid); 2, a YONOS-SR x2 teacher (the
    # x2 image enters space-to-depth: pixel_unshuffle by 2, 12 channels at the same grid; not a pipeline folder)
    scale: int = SCALE
    # an x4 teacher folder to start from: its VAE (frozen, no VAE stage) and text encoder are reused and referenced,
    # its UNet's weights copied with conv_in widened to the x2 conditioning (see widen_conv_in)
    init_from: str | None = None
    patch_size: int = PATCH_SIZE  # HR crop side; LR = patch_size / scale
    noise_level: int = 20  # the pipeline's noise_level the teacher is trained and meant to run at
    num_inference_steps: int = 20
    max_minutes: float | None = None  # wall-time cap of the whole run: the UNet stage stops early (not
    # reproducible then; stats.unet.stopped_early says so), leaving RESERVE_MINUTES for saving and evaluation
    evaluate: bool = True  # run evaluate() on the saved folder and store it in fastdiff_teacher.json
    eval_max_patches: int | None = None  # null: the whole held-out grid
    vae: VAEConfig = field(
        default_factory=lambda: VAEConfig(steps=1500, batch_size=32, lr=1e-3, checkpoint_minutes=5.0)
    )
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            steps=20000,
            batch_size=32,
            lr=5e-4,
            lr_floor=0.1,
            warmup_steps=200,
            weight_decay=0.01,
            ema_decay=0.999,
        )
    )


def load_teacher_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> SRTeacherConfig:
    """Load an SR teacher recipe and apply ``key=value`` overrides; unknown keys raise ConfigError.

    Args:
        path: YAML file (None: the defaults).
        overrides: dotted ``key=value`` strings, values typed as YAML reads them.
    """
    cfg = load_recipe(SRTeacherConfig, path, overrides)
    if cfg.patch_size % (4 * SCALE):
        raise ConfigError(f"patch_size must be a multiple of {4 * SCALE}, got {cfg.patch_size}")
    if cfg.unet.init not in ("random", "copy") or cfg.vae.init not in ("random", "resampler"):
        raise ConfigError(f"unet.init must be random|copy and vae.init random|resampler, got {cfg.unet.init!r}, "
                          f"{cfg.vae.init!r}")  # fmt: skip
    if cfg.unet.init == "copy" and cfg.unet.prediction_type != "sample":
        raise ConfigError(
            "unet.init=copy starts the UNet as an x0 predictor: set unet.prediction_type=sample"
        )
    if cfg.unet.prediction_type not in ("v_prediction", "sample"):
        raise ConfigError(
            f"unet.prediction_type must be v_prediction or sample, got {cfg.unet.prediction_type!r}"
        )
    if not 0 <= cfg.noise_level <= MAX_NOISE_LEVEL:
        raise ConfigError(f"noise_level must be in [0, {MAX_NOISE_LEVEL}], got {cfg.noise_level}")
    if cfg.scale not in (2, SCALE):
        raise ConfigError(
            f"scale must be 4 (the pipeline teacher) or 2 (a YONOS-SR x2 teacher), got {cfg.scale}"
        )
    if cfg.init_from is not None and cfg.scale == SCALE:
        raise ConfigError("init_from starts an x2 teacher from an x4 one: set scale=2 (or --scale 2)")
    return cfg


# ------------------------------------------------------------------------------------------------- models


def build_vae(cfg: VAEConfig, seed: int):
    """A random-init AutoencoderKL with 4 latent channels, downsampling 2**(levels-1) (4 for three blocks)."""
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    if 2 ** (n - 1) != SCALE:
        raise ConfigError(f"vae.block_out_channels needs 3 levels (4x down), got {n}")
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        latent_channels=4,
        sample_size=PATCH_SIZE,
        scaling_factor=VAE_SCALING,
    )


def build_text_encoder(cfg: TextConfig, vocab_size: int, seed: int):
    """A random-init CLIPTextModel, frozen, eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_unet(
    cfg: UNetConfig, text: TextConfig, seed: int, sample_size: int = PATCH_SIZE // SCALE, in_channels: int = 7
):
    """A random-init x4-upscaler UNet: 7 input channels (4 + 12 for an x2 teacher), noise level as class label,
    cross-attention where asked."""
    from diffusers import UNet2DConditionModel

    levels = {k: len(getattr(cfg, k)) for k in ("block_out_channels", "cross_attention", "attention_heads")}
    if len(set(levels.values())) != 1:
        raise ConfigError(f"unet: the per-level lists must have one entry per level, got lengths {levels}")
    torch.manual_seed(seed)
    xattn = list(cfg.cross_attention)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in xattn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(xattn)),
        attention_head_dim=tuple(cfg.attention_heads),  # diffusers reads this as the number of heads
        cross_attention_dim=text.hidden_size,
        use_linear_projection=True,
        num_class_embeds=1000,
    )


def build_scheduler(prediction_type: str = "v_prediction"):
    """The real upscaler's sampling schedule (scaled_linear 0.0001-0.02) as DDIM, trailing spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def build_low_res_scheduler():
    """The DDPM schedule that noises the low-resolution image (the real upscaler's low_res_scheduler)."""
    from ..models.tiny import tiny_low_res_scheduler

    return tiny_low_res_scheduler()


def assemble_pipeline(vae, text_encoder, unet, prediction_type: str = "v_prediction"):
    """The StableDiffusionUpscalePipeline around the trained parts."""
    from diffusers import StableDiffusionUpscalePipeline

    from ..models.tiny import make_tokenizer

    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(),
        unet=unet,
        low_res_scheduler=build_low_res_scheduler(),
        scheduler=build_scheduler(prediction_type),
        max_noise_level=MAX_NOISE_LEVEL,
    )


@torch.no_grad()
def rescale_latents(vae, factor: float):
    """Multiply the VAE's latent space by ``factor`` without changing what it encodes or decodes: posterior mean
    and std times ``factor`` (``quant_conv``), decoder input divided by it (``post_quant_conv``)."""
    c = vae.config.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:c] *= factor
    qc.bias[:c] *= factor
    qc.bias[c:] += 2 * math.log(factor)  # log-variance
    pqc.weight /= factor


# ------------------------------------------------------------------------------------------------- one stage


def batch_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The RNG of one step: batches are a pure function of (seed, stage, step), so resume is exact."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_003 + step) % (2**63))


def train_stage(
    name: str,
    module: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    cfg: StageConfig,
    state_dir: Path | None = None,
    resume: bool = False,
    deadline: float | None = None,
) -> dict:
    """Train ``module`` on ``loss_fn(step)`` (a batch made from the step alone) with AdamW and an optional EMA,
    checkpointing to ``state_dir/name`` every ``cfg.checkpoint_minutes``; the EMA (if any) is loaded at the end.

    Args:
        name: the stage's name (checkpoint folder, logs).
        module: the network; all its parameters train.
        loss_fn: step -> scalar loss.
        cfg: the stage's optimisation settings.
        state_dir: where checkpoints go (None: no checkpoints).
        resume: continue from ``state_dir/name`` if there is a checkpoint.
        deadline: a ``time.time()`` at which to stop early (None: run all steps).

    Returns:
        stats: steps, wall time, steps/s, the loss curve [(step, mean loss)], whether the deadline stopped it.
    """
    module.train().requires_grad_(True)
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay is not None else None
    state = {"step": 0, "elapsed_s": 0.0, "curve": []}
    ckpt = None if state_dir is None else Path(state_dir) / name
    if resume and ckpt is not None and (ckpt / "state.pt").is_file():
        saved = torch.load(ckpt / "state.pt", weights_only=True)
        module.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        if ema is not None:
            for e, s in zip(ema, saved["ema"]):
                e.copy_(s)
        state = json.loads((ckpt / "state.json").read_text())
        print(
            f"[{name}] resumed at step {state['step']} ({state['elapsed_s'] / 60:.1f} min done)", flush=True
        )
    start, last_ckpt = time.time() - state["elapsed_s"], time.time()
    stopped_early, run = False, []
    for step in range(state["step"], cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_scale(step, cfg.steps, cfg.warmup_steps, cfg.lr_floor)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            d = min(cfg.ema_decay, (1 + step) / (10 + step))  # diffusers' EMA warm-up
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        run.append(loss.item())
        done = step + 1
        state["step"], state["elapsed_s"] = done, time.time() - start
        if done % cfg.log_every == 0 or done == cfg.steps:
            state["curve"].append((done, sum(run) / len(run)))
            print(f"[{name}] step {done}/{cfg.steps} loss {state['curve'][-1][1]:.5f}", flush=True)
            run = []
        stopped_early = deadline is not None and time.time() > deadline and done < cfg.steps
        if ckpt is not None and (stopped_early or time.time() - last_ckpt > cfg.checkpoint_minutes * 60):
            _save_checkpoint(ckpt, module, opt, ema, state)
            last_ckpt = time.time()
        if stopped_early:
            print(
                f"[{name}] deadline reached: stopping at step {done}/{cfg.steps} (checkpointed)", flush=True
            )
            break
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    module.eval().requires_grad_(False)
    return {
        "steps": state["step"],
        "wall_s": round(state["elapsed_s"], 1),
        "steps_per_s": round(state["step"] / max(state["elapsed_s"], 1e-9), 3),
        "loss_curve": state["curve"],
        "stopped_early": stopped_early,
    }


def _save_checkpoint(ckpt: Path, module, opt, ema, state: dict):
    """Atomically replace ``ckpt``: weights, optimizer, EMA (state.pt) and the step and curve (state.json)."""
    new = ckpt.with_name(ckpt.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    torch.save(
        {"module": module.state_dict(), "optimizer": opt.state_dict(), "ema": ema or []}, new / "state.pt"
    )
    (new / "state.json").write_text(json.dumps(state))
    shutil.rmtree(ckpt, ignore_errors=True)
    new.rename(ckpt)


# ------------------------------------------------------------------------------------------------- losses


def vae_loss_fn(vae, cfg: VAEConfig, seed: int, patch_size: int) -> Callable[[int], torch.Tensor]:
    """Stage 1's loss of a step: MSE reconstruction of random HR crops + ``kl_weight`` x KL (+ ``align_weight`` x
    the LR alignment of the first three latent channels)."""
    size = cfg.patch_size or patch_size

    def loss(step: int) -> torch.Tensor:
        gen = batch_generator(seed, 1, step)
        pairs = random_pairs(cfg.batch_size, gen, "train", size)
        x = pairs.hr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        total = F.mse_loss(vae.decode(z).sample, x) + cfg.kl_weight * post.kl().mean()
        if cfg.align_weight:
            total = total + cfg.align_weight * F.mse_loss(post.mean[:, :3], pairs.lr)
        return total

    return loss


def empty_prompt_embeds(pipe) -> torch.Tensor:
    """The text encoder's embedding of "" as the pipeline computes it, ``[1, 77, hidden]``."""
    embeds, _ = pipe.encode_prompt("", torch.device("cpu"), 1, False)
    return embeds


def noised_low_res(pipe, lr: torch.Tensor, noise_level: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The LR image as the pipeline feeds it to the UNet: ``low_res_scheduler.add_noise`` at ``noise_level``."""
    noise = torch.randn(lr.shape, generator=gen)
    return pipe.low_res_scheduler.add_noise(lr, noise, noise_level)


def unet_loss_fn(pipe, cfg: SRTeacherConfig, seed: int) -> Callable[[int], torch.Tensor]:
    """Stage 2's loss of a step: v-prediction MSE on 0.08333 x VAE latents of HR crops, the UNet seeing the noised
    latents concatenated with the noised LR image and the noise level as class label, exactly as at inference (a
    scale-2 teacher: the noised x2 image space-to-depth instead of the LR image)."""
    prompt = empty_prompt_embeds(pipe)
    scale = pipe.vae.config.scaling_factor
    b, scheduler = cfg.unet.batch_size, pipe.scheduler
    factor = SCALE // cfg.scale  # 1: the LR image as it is; 2: the x2 image space-to-depth

    def loss(step: int) -> torch.Tensor:
        gen = batch_generator(seed, 2, step)
        pairs = random_pairs(b, gen, "train", cfg.patch_size)
        with torch.no_grad():
            post = pipe.vae.encode(pairs.hr).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen)) * scale
        if cfg.unet.noise_level_max is None:
            level = torch.full((b,), cfg.noise_level, dtype=torch.long)
        else:
            level = torch.randint(0, cfg.unet.noise_level_max + 1, (b,), generator=gen)
        if factor == 1:
            lr = noised_low_res(pipe, pairs.lr, level, gen)
        else:
            lr = space_to_depth(noised_low_res(pipe, downscale(pairs.hr, cfg.scale), level, gen), factor)
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
        z_t = scheduler.add_noise(z0, eps, t)
        model_input = torch.cat([scheduler.scale_model_input(z_t, t), lr], dim=1)
        pred = pipe.unet(
            model_input, t, encoder_hidden_states=prompt.expand(b, -1, -1), class_labels=level
        ).sample
        target = z0 if scheduler.config.prediction_type == "sample" else scheduler.get_velocity(z0, eps, t)
        return F.mse_loss(pred, target)

    return loss


@torch.no_grad()
def latent_std(vae, seed: int, patch_size: int, n: int = 256) -> float:
    """Std of (unscaled) posterior samples of ``n`` random train crops."""
    gen = batch_generator(seed, 0, 0)
    post = vae.encode(random_pairs(n, gen, "train", patch_size).hr).latent_dist
    return float((post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).std())


@torch.no_grad()
def vae_heldout_psnr(vae, max_patches: int | None = None) -> float:
    """Mean PSNR-Y (dB) of the posterior-mean reconstruction of the held-out grid patches (the teacher's ceiling)."""
    hr = grid_pairs("heldout").hr[:max_patches]
    rec = torch.cat([vae.decode(vae.encode(x).latent_dist.mean).sample for x in hr.split(64)])
    return float(psnr_y(_quantize(rec), hr).mean())


# ------------------------------------------------------------------------------------------------- whole run


def train_teacher(cfg: SRTeacherConfig, out: str | Path, resume: bool = False) -> Path:
    """Train both stages, save the pipeline folder to ``out`` (+ ``fastdiff_teacher.json``) and evaluate it.

    Args:
        cfg: the recipe.
        out: output folder.
        resume: continue from the checkpoints in ``out/_train_state`` (``cfg.max_minutes`` then counts from the
            resumed start).
    """
    from diffusers import AutoencoderKL

    from ..models.tiny import make_tokenizer

    out = Path(out)
    state_dir = out / STATE_DIR
    if not resume and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    deadline = None if cfg.max_minutes is None else t0 + (cfg.max_minutes - RESERVE_MINUTES) * 60
    stats: dict = {"num_threads": cfg.num_threads}

    # 1. VAE
    vae_dir = state_dir / "vae_done"
    factor = SCALE // cfg.scale  # the conditioning's space-to-depth factor (1: the x4 LR image as it is)
    base = None
    if cfg.init_from is not None:  # an x2 teacher on an x4 teacher's VAE and text encoder (no VAE stage)
        base = _load_upscale_parts(cfg.init_from)
        vae = base["vae"]
        stats["vae"] = {"init_from": str(cfg.init_from)}
        stats["vae"]["heldout_psnr_y"] = round(vae_heldout_psnr(vae, cfg.eval_max_patches), 3)
    elif resume and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        stats["vae"] = json.loads((state_dir / "vae_stats.json").read_text())
        print(f"[vae] trained VAE loaded from {vae_dir}", flush=True)
    else:
        vae = build_vae(cfg.vae, cfg.seed)
        if cfg.vae.init == "resampler":
            init_as_resampler(vae)
        vae_loss = vae_loss_fn(vae, cfg.vae, cfg.seed, cfg.patch_size)
        stats["vae"] = train_stage("vae", vae, vae_loss, cfg.vae, state_dir, resume)
        std = latent_std(vae, cfg.seed, cfg.patch_size)
        rescale_latents(vae, 1.0 / (VAE_SCALING * std))
        stats["vae"]["latent_std_before_rescale"] = std
        stats["vae"]["scaled_latent_std"] = VAE_SCALING * latent_std(vae, cfg.seed, cfg.patch_size)
        stats["vae"]["heldout_psnr_y"] = round(vae_heldout_psnr(vae, cfg.eval_max_patches), 3)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        (state_dir / "vae_stats.json").write_text(json.dumps(stats["vae"]))
    print(f"[vae] held-out reconstruction PSNR-Y {stats['vae']['heldout_psnr_y']} dB", flush=True)

    # 2. UNet
    if base is not None:
        if base["prediction_type"] != cfg.unet.prediction_type:
            raise ConfigError(
                f"init_from={cfg.init_from} predicts {base['prediction_type']!r}: set unet.prediction_type to it"
            )
        text_encoder = base["text_encoder"]
        unet = widen_conv_in(base["unet"], factor)
        stats["unet_init_from"] = str(cfg.init_from)
    else:
        text_encoder = build_text_encoder(cfg.text, len(make_tokenizer()), cfg.seed + 100)
        unet = build_unet(
            cfg.unet, cfg.text, cfg.seed + 200, cfg.patch_size // SCALE, in_channels=4 + 3 * factor**2
        )
        if cfg.unet.init == "copy":
            gains = latent_gains(vae, cfg.seed, cfg.patch_size)
            init_unet_as_copy(unet, gains, factor=factor)
            stats["unet_copy_gains"] = gains
    pipe = assemble_pipeline(vae, text_encoder, unet, cfg.unet.prediction_type)
    stats["params"] = {
        "vae": num_params(vae),
        "text_encoder": num_params(text_encoder),
        "unet": num_params(unet),
    }
    print(f"[params] {stats['params']}", flush=True)
    stats["unet"] = train_stage(
        "unet", unet, unet_loss_fn(pipe, cfg, cfg.seed + 300), cfg.unet, state_dir, resume, deadline
    )

    if cfg.scale == SCALE:
        pipe.save_pretrained(out, safe_serialization=True)
        if cfg.evaluate:
            stats["evaluate"] = evaluate(
                out, cfg.num_inference_steps, cfg.noise_level, cfg.seed, cfg.eval_max_patches
            )
    else:
        save_scale_teacher(out, pipe, cfg.init_from)
        write_teacher_json(out, cfg, stats)  # the loader reads it
        if cfg.evaluate:
            stats["evaluate"] = evaluate_scale_teacher(
                out, cfg.num_inference_steps, cfg.noise_level, cfg.seed, cfg.eval_max_patches
            )
            if cfg.init_from is not None:  # the x4 teacher it started from, same patches and protocol
                stats["evaluate"]["init_from"] = evaluate(
                    cfg.init_from, cfg.num_inference_steps, cfg.noise_level, cfg.seed, cfg.eval_max_patches
                )["teacher"]
    stats["total_wall_s"] = round(time.time() - t0, 1)
    write_teacher_json(out, cfg, stats)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"[done] {out} in {stats['total_wall_s'] / 60:.1f} min; {folder_mb(out):.1f} MB", flush=True)
    return out


def write_teacher_json(out: Path, cfg: SRTeacherConfig, stats: dict):
    """``fastdiff_teacher.json``: the sampling recipe, training stats and the config."""
    info = {
        "pipeline": "StableDiffusionUpscalePipeline",
        "prompt": "",
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": 0.0,
        "noise_level": cfg.noise_level,
        "lr_patch_size": cfg.patch_size // SCALE,
        "degradation": "fastdiff.sr.data.downscale (antialiased bicubic x4, 8-bit)",
        "train_command": TRAIN_COMMAND,
        **_scale_fields(out, cfg),
        "stats": stats,
        "config": dataclasses.asdict(cfg),
    }
    (Path(out) / "fastdiff_teacher.json").write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------------------- evaluation


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """To 8-bit levels, as a saved image."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1)


@torch.no_grad()
def upscale(pipe, lr: torch.Tensor, steps: int, noise_level: int, seed: int, batch: int = 64) -> torch.Tensor:
    """Run the pipeline as a user would (prompt "", PIL LR images, no CFG) on ``lr`` ``[N, 3, h, w]``; returns the
    8-bit outputs as ``[N, 3, 4h, 4w]`` in [-1, 1]."""
    outputs = []
    for i in range(0, len(lr), batch):
        images = [to_pil(x) for x in lr[i : i + batch]]
        result = pipe(
            prompt=[""] * len(images),
            image=images,
            num_inference_steps=steps,
            guidance_scale=0.0,
            noise_level=noise_level,
            generator=torch.Generator().manual_seed(seed + i),
        ).images
        outputs += [from_pil(image) for image in result]
    return torch.stack(outputs)


def _scores(pred: torch.Tensor, hr: torch.Tensor, names: list[str] | None = None) -> dict:
    """PSNR-Y per image (each held-out photo's grid patches pooled, then the mean over photos: the usual SR
    figure), per patch (mean) and over all patches pooled; SSIM-Y per patch (mean)."""
    y_pred, y_hr = rgb_to_y(pred), rgb_to_y(hr)
    mse = (y_pred - y_hr).pow(2).mean()
    out = {}
    if names is not None:
        per_image = []
        for name in dict.fromkeys(names):
            keep = torch.tensor([n == name for n in names])
            per_image.append(10 * torch.log10(255.0**2 / (y_pred[keep] - y_hr[keep]).pow(2).mean()))
        out["psnr_y_image"] = round(float(torch.stack(per_image).mean()), 3)
    return {
        **out,
        "psnr_y_mean": round(float(psnr(y_pred, y_hr).mean()), 3),
        "psnr_y_pooled": round(float(10 * torch.log10(255.0**2 / mse)), 3),
        "ssim_y_mean": round(float(ssim_y(pred, hr).mean()), 4),
    }


def evaluate(
    folder: str | Path,
    num_inference_steps: int | None = None,
    noise_level: int | None = None,
    seed: int = 0,
    max_patches: int | None = None,
) -> dict:
    """The teacher at ``num_inference_steps`` and bicubic on the held-out grid (``grid_pairs("heldout")``).

    Both outputs are quantized to 8 bits. Reports PSNR-Y per image (the mean over the held-out photos of each
    one's PSNR over its grid patches, as SR benchmarks report), as the mean over patches and pooled over all
    patches, SSIM-Y as the mean over patches; ``ship`` is True only if the teacher's per-image PSNR-Y beats
    bicubic's.

    Args:
        folder: a StableDiffusionUpscalePipeline folder.
        num_inference_steps, noise_level: default: ``fastdiff_teacher.json``'s, else 20 and 20.
        seed: seeds the pipeline's noise.
        max_patches: evaluate the first ``max_patches`` held-out patches only (None: all).
    """
    from diffusers import StableDiffusionUpscalePipeline

    info_path = Path(folder) / "fastdiff_teacher.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    steps = num_inference_steps or info.get("num_inference_steps", 20)
    noise_level = info.get("noise_level", 20) if noise_level is None else noise_level
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pairs = grid_pairs("heldout")
    hr, lr, names = pairs.hr[:max_patches], pairs.lr[:max_patches], pairs.names[:max_patches]
    t0 = time.time()
    teacher = upscale(pipe, lr, steps, noise_level, seed)
    seconds = time.time() - t0
    result = {
        "patches": len(hr),
        "hr_size": hr.shape[-1],
        "num_inference_steps": steps,
        "noise_level": noise_level,
        "teacher": dict(_scores(teacher, hr, names), seconds_per_patch=round(seconds / len(hr), 4)),
        "bicubic": _scores(_quantize(bicubic_upscale(lr)), hr, names),
    }
    result["ship"] = bool(result["teacher"]["psnr_y_image"] > result["bicubic"]["psnr_y_image"])
    print(f"[evaluate] {json.dumps(result)}", flush=True)
    return result


def _constant_groups(norm, out_conv, level: float, shift: float):
    """The output end of an identity-initialised encoder or decoder: GroupNorm ``norm`` groups c = 0, 1, 2 hold
    (x_c, -x_c, L, -L, 0, ...) (whoever feeds them puts them there), so each group's mean is 0 and its variance
    ~2L²/n whatever x is (n channels per group): its scale L·sqrt(2/n) gives x back (relative error
    mean(x²)/2L²); a shift keeps the SiLU after it linear (error ~shift·e^-shift), which ``out_conv``'s bias
    removes: ``out_conv`` channel c = x_c."""
    n = norm.num_channels // norm.num_groups
    if n < 4 or norm.num_groups < 3:
        raise ConfigError(
            f"vae.init=resampler needs >= 3 groups of >= 4 channels in GroupNorm({norm.num_groups}, "
            f"{norm.num_channels}): choose vae.norm_num_groups dividing every block's channels into groups of >= 4"
        )
    norm.weight.zero_()
    norm.bias.zero_()
    out_conv.weight.zero_()
    out_conv.bias.zero_()
    for c in range(3):
        norm.weight[n * c] = level * math.sqrt(2 / n)
        norm.bias[n * c] = shift
        out_conv.weight[c, n * c, 1, 1] = 1.0
        out_conv.bias[c] = -shift
    return n


def _split_signs(conv, n: int):
    """A 1x1 channel-changing shortcut that writes x_c and -x_c into group c (channels n c, n c + 1)."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[n * c, c] = 1.0
        conv.weight[n * c + 1, c] = -1.0


def _identity_blocks(module):
    """Zero every resnet branch and attention output inside ``module``: each block passes its input through."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for m in module.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
        elif isinstance(m, Attention):
            m.to_out[0].weight.zero_()
            m.to_out[0].bias.zero_()


def _per_channel(conv, kernel: torch.Tensor, channels: int):
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    for c in range(channels):
        conv.weight[c, c, : kernel.shape[0], : kernel.shape[1]] = kernel


@torch.no_grad()
def init_as_resampler(
    vae, sharpen: float = 0.2, level: float = 50.0, shift: float = 12.0, logvar: float = -10.0
):
    """Start the VAE as a resampler (``vae.init=resampler``): the encoder writes a box-downscaled image into latent
    channels 0-2 (what ``VAEConfig.align_weight`` keeps them near: the LR image) and 0 into channel 3, with posterior
    log-variance ``logvar``; the decoder upsamples channels 0-2 back (a sharpening 3x3 prefilter, then linear
    interpolation x2 per level). Every resnet branch and attention output starts at zero (the blocks are
    identities), so training adds to a resampler rather than learning interpolation from scratch (a residual start,
    as in VDSR); on the held-out patches' interiors the start equals bicubic's PSNR, the patch borders (zero
    padding) are left to training. GroupNorm at each end keeps the image through ``_constant_groups``."""
    enc, dec = vae.encoder, vae.decoder
    box = torch.full((2, 2), 0.25)  # Downsample2D pads (0, 1, 0, 1), so taps 0-1 are pixels 2i, 2i+1
    k1 = torch.tensor([-sharpen, 1 + 2 * sharpen, -sharpen])
    lin = torch.tensor([1.0, 2.0, 1.0]) / 4  # after nearest x2: linear interpolation at half-pixel offsets
    _identity_blocks(enc)
    _identity_blocks(dec)
    # encoder: image -> box-downscaled image in channels 0-2 of the last block, as (x, -x, L, -L) groups
    _per_channel(
        enc.conv_in, torch.zeros(3, 3).index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(1.0)), 3
    )
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            _per_channel(down.conv, box, down.conv.out_channels)
    shortcuts = [r for b in enc.down_blocks for r in b.resnets if r.conv_shortcut is not None]
    n = enc.conv_norm_out.num_channels // enc.conv_norm_out.num_groups
    if not shortcuts:
        raise ConfigError(
            "vae.init=resampler needs a channel change in the encoder (block_out_channels rising)"
        )
    for r in shortcuts[:-1]:
        _per_channel(r.conv_shortcut, torch.ones(1, 1), 3)
    _split_signs(shortcuts[-1].conv_shortcut, n)
    last = enc.mid_block.resnets[-1].conv2
    for c in range(3):
        last.bias[n * c + 2], last.bias[n * c + 3] = level, -level
    _constant_groups(enc.conv_norm_out, enc.conv_out, level, shift)
    enc.conv_out.bias[vae.config.latent_channels :] = logvar
    eye = torch.eye(2 * vae.config.latent_channels)
    vae.quant_conv.weight.copy_(eye[:, :, None, None])
    vae.quant_conv.bias.zero_()
    # decoder: latent channels 0-2 -> upsampled image
    eye = torch.eye(vae.config.latent_channels)
    vae.post_quant_conv.weight.copy_(eye[:, :, None, None])
    vae.post_quant_conv.bias.zero_()
    _per_channel(dec.conv_in, torch.outer(k1, k1), 3)
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            _per_channel(up.conv, torch.outer(lin, lin), up.conv.out_channels)
    shortcuts = [r for b in dec.up_blocks for r in b.resnets if r.conv_shortcut is not None]
    if not shortcuts:
        raise ConfigError(
            "vae.init=resampler needs a channel change in the decoder (block_out_channels rising)"
        )
    n = dec.conv_norm_out.num_channels // dec.conv_norm_out.num_groups
    for r in shortcuts[:-1]:
        _per_channel(r.conv_shortcut, torch.ones(1, 1), 3)
    _split_signs(shortcuts[-1].conv_shortcut, n)
    last = dec.up_blocks[-1].resnets[-1].conv2
    for c in range(3):
        last.bias[n * c + 2], last.bias[n * c + 3] = level, -level
    _constant_groups(dec.conv_norm_out, dec.conv_out, level, shift)


@torch.no_grad()
def latent_gains(vae, seed: int, patch_size: int, n: int = 256) -> list[float]:
    """Per colour, the least-squares gain g_c with scaled latent channel c ~ g_c x LR channel c (the alignment the
    VAE was trained with, in the pipeline's latent scale)."""
    pairs = random_pairs(n, batch_generator(seed, 3, 0), "train", patch_size)
    z = vae.encode(pairs.hr).latent_dist.mean * vae.config.scaling_factor
    return [float((z[:, c] * pairs.lr[:, c]).sum() / pairs.lr[:, c].square().sum()) for c in range(3)]


@torch.no_grad()
def init_unet_as_copy(unet, gains: list[float], level: float = 50.0, shift: float = 12.0, factor: int = 1):
    """Start an x0-predicting upscaler UNet as a copy of its conditioning: latent channels 0-2 = gain_c x the LR
    image (input channels 4-6), channel 3 = 0. The path is conv_in's skip into the last resnet of the last up block
    (its 1x1 shortcut reads only the LR copy), with every resnet branch and transformer output at zero so the
    trunk, time and class embeddings start without effect; the final GroupNorm keeps the image through
    ``_constant_groups``. Training adds to the copy (the UNet then learns the 4th channel and corrections).
    ``factor`` > 1: the conditioning is a larger image space-to-depth (``space_to_depth``), read as the mean of each
    colour's ``factor²`` sub-pixel channels (its box-downscale)."""
    from diffusers.models.resnet import ResnetBlock2D

    latent = unet.config.out_channels
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
        elif hasattr(m, "proj_out") and hasattr(m, "transformer_blocks"):
            m.proj_out.weight.zero_()
            m.proj_out.bias.zero_()
    unet.conv_in.weight[:3].zero_()
    unet.conv_in.bias[:3].zero_()
    r2 = factor * factor
    for c in range(3):
        for k in range(r2):
            unet.conv_in.weight[c, latent + c * r2 + k, 1, 1] = 1.0 / r2
    final = unet.up_blocks[-1].resnets[-1]
    n = unet.conv_norm_out.num_channels // unet.conv_norm_out.num_groups
    hidden = final.conv1.in_channels - unet.config.block_out_channels[0]  # cat([trunk, conv_in skip])
    final.conv_shortcut.weight.zero_()
    final.conv_shortcut.bias.zero_()
    for c in range(3):
        final.conv_shortcut.weight[n * c, hidden + c] = gains[c]
        final.conv_shortcut.weight[n * c + 1, hidden + c] = -gains[c]
        final.conv2.bias[n * c + 2], final.conv2.bias[n * c + 3] = level, -level
    _constant_groups(unet.conv_norm_out, unet.conv_out, level, shift)


# ------------------------------------------------------------------------------------------------- the x2 teacher
# YONOS-SR's teacher at a smaller magnification: the bundled x4 teacher's shape except its conditioning, the x2 image
# (32x32 for a 64 crop) space-to-depth (pixel_unshuffle by 2: 12 channels at the 16x16 latent grid), so it sees the
# same noisy latents as the x4 student. StableDiffusionUpscalePipeline cannot feed 12 conditioning channels, so the
# folder is not a pipeline: unet/ and scheduler/, plus fastdiff_teacher.json (``kind: scale-teacher``, ``scale``,
# ``conditioning``, ``unshuffle_factor``, ``base``: the folder holding vae/, text_encoder/, tokenizer/ and
# low_res_scheduler/, relative to it: the x4 teacher it started from, or "." when trained from scratch).

SCALE_TEACHER_KIND = "scale-teacher"
SCALE_TEACHER_COMMAND = "python train/sr_teacher.py --config assets/configs/teacher_sr_x2.yaml --scale 2"
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "low_res_scheduler")


@torch.no_grad()
def widen_conv_in(unet, factor: int):
    """A copy of an x4 upscaler UNet whose conv_in reads a ``factor``-times larger image space-to-depth: the latent
    columns as they are, each colour's ``factor²`` sub-pixel columns the x4 weight over ``factor²``, so at the
    start the UNet reads the box-downscale of the larger image where it read the LR image."""
    from diffusers import UNet2DConditionModel

    latent, r2 = unet.config.out_channels, factor * factor
    colours = unet.config.in_channels - latent
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": latent + colours * r2})
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    old = state.pop("conv_in.weight")
    weight = torch.cat([old[:, :latent], old[:, latent:].repeat_interleave(r2, dim=1) / r2], dim=1)
    missing = wide.load_state_dict({**state, "conv_in.weight": weight}, strict=True)
    assert not missing.missing_keys
    return wide if unet.dtype == torch.float32 else wide.to(unet.dtype)


def _load_upscale_parts(folder: str | Path, dtype=torch.float32) -> dict:
    """The components of an upscaler folder (a StableDiffusionUpscalePipeline or a scale teacher's base): frozen."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vae").is_dir():
        raise FileNotFoundError(f"{folder} has no vae/: not an upscaler folder")
    parts = {
        "vae": AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "low_res_scheduler": DDPMScheduler.from_pretrained(folder / "low_res_scheduler"),
    }
    for name in ("vae", "text_encoder"):
        parts[name].eval().requires_grad_(False)
    if (folder / "unet").is_dir() and (folder / "scheduler").is_dir():
        parts["unet"] = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        parts["scheduler"] = DDIMScheduler.from_pretrained(folder / "scheduler")
        parts["prediction_type"] = parts["scheduler"].config.prediction_type
    return parts


def save_scale_teacher(out: str | Path, pipe, init_from: str | Path | None = None) -> Path:
    """Write a scale teacher's folder: unet/ and scheduler/, and the base components (vae, text encoder, tokenizer,
    low_res_scheduler) unless they are ``init_from``'s (referenced by ``_scale_fields``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.unet.save_pretrained(out / "unet", safe_serialization=True)
    pipe.scheduler.save_pretrained(out / "scheduler")
    if init_from is None:
        for name in BASE_COMPONENTS:
            getattr(pipe, name).save_pretrained(out / name)
    return out


def init_scale_teacher(init_from: str | Path, out: str | Path, scale: int = 2, noise_level: int = 0) -> Path:
    """An untrained scale teacher folder: ``init_from``'s UNet with conv_in widened (``widen_conv_in``, the start of
    ``init_from`` training), its VAE and text encoder referenced; tiny test teachers and checks use it."""
    from types import SimpleNamespace

    parts = _load_upscale_parts(init_from)
    unet = widen_conv_in(parts["unet"], SCALE // scale)
    cfg = SRTeacherConfig(scale=scale, init_from=str(init_from), noise_level=noise_level)
    cfg.unet.prediction_type = parts["prediction_type"]
    save_scale_teacher(out, SimpleNamespace(unet=unet, scheduler=parts["scheduler"]), init_from)
    write_teacher_json(Path(out), cfg, {"trained": False})
    return Path(out)


def _scale_fields(out: Path, cfg: SRTeacherConfig) -> dict:
    """fastdiff_teacher.json's fields of a scale teacher (none for the x4 pipeline teacher)."""
    if cfg.scale == SCALE:
        return {}
    factor = SCALE // cfg.scale
    base = (
        "." if cfg.init_from is None else os.path.relpath(Path(cfg.init_from).resolve(), Path(out).resolve())
    )
    return {
        "pipeline": None,
        "kind": SCALE_TEACHER_KIND,
        "scale": cfg.scale,
        "conditioning": "pixel_unshuffle",
        "unshuffle_factor": factor,
        "conditioning_channels": 3 * factor**2,
        "base": Path(base).as_posix(),
        "lr_patch_size": cfg.patch_size // cfg.scale,
        "degradation": f"fastdiff.sr.data.downscale (antialiased bicubic x{cfg.scale}, 8-bit)",
        "train_command": SCALE_TEACHER_COMMAND,
        "load": "fastdiff.sr.teacher.load_scale_teacher(folder)",
    }


@dataclass
class ScaleTeacher:
    """A loaded scale teacher: its UNet (input: 4 latent channels + the ``scale`` image's ``space_to_depth`` by
    ``factor``), its DDIM scheduler, and the base components it shares with its x4 teacher."""

    folder: Path
    base: Path
    scale: int
    factor: int
    noise_level: int
    unet: torch.nn.Module
    scheduler: object
    info: dict
    parts: dict | None = None  # vae, text_encoder, tokenizer, low_res_scheduler (``with_base=True``)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def condition(self, noised_image: torch.Tensor) -> torch.Tensor:
        """The UNet's conditioning channels from the (low_res_scheduler-noised) ``scale`` image."""
        return space_to_depth(noised_image, self.factor)


def load_scale_teacher(folder: str | Path, dtype=torch.float32, with_base: bool = False) -> ScaleTeacher:
    """Load a scale teacher folder (``save_scale_teacher``); ``with_base`` also loads its base components."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = Path(folder)
    info_path = folder / "fastdiff_teacher.json"
    if not info_path.is_file():
        raise ValueError(f"{folder} is not a scale teacher: no fastdiff_teacher.json (train one with "
                                f"`{SCALE_TEACHER_COMMAND} --out {folder}`)")  # fmt: skip
    info = json.loads(info_path.read_text())
    if info.get("kind") != SCALE_TEACHER_KIND:
        raise ValueError(f"{folder} is not a scale teacher (fastdiff_teacher.json kind {info.get('kind')!r})")
    unet = (
        UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval().requires_grad_(False)
    )
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    factor = int(info["unshuffle_factor"])
    expected = unet.config.out_channels + 3 * factor**2
    if unet.config.in_channels != expected:
        raise ValueError(
            f"{folder}: the UNet takes {unet.config.in_channels} channels, not 4 + 3 x {factor}²"
        )
    base = (folder / info.get("base", ".")).resolve()
    st = ScaleTeacher(
        folder, base, int(info["scale"]), factor, int(info.get("noise_level", 0)), unet, scheduler, info
    )
    if with_base:
        st.parts = _load_upscale_parts(base, dtype)
    return st


@torch.no_grad()
def upscale_scale_teacher(
    st: ScaleTeacher, low_res: torch.Tensor, steps: int, noise_level: int, seed: int, batch: int = 64
) -> torch.Tensor:
    """A scale teacher's DDIM sampler on ``low_res`` ``[N, 3, h, w]`` (its scale's LR images): as the upscale
    pipeline samples (empty prompt, the image noised by low_res_scheduler at ``noise_level``, pure-noise latents at
    the latent grid), conditioning space-to-depth; 8-bit outputs ``[N, 3, scale h, scale w]`` in [-1, 1]."""
    from diffusers import DDIMScheduler

    parts = st.parts or _load_upscale_parts(st.base)
    vae, low_sched = parts["vae"], parts["low_res_scheduler"]
    ids = parts["tokenizer"]([""], padding="max_length", max_length=parts["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
    prompt = parts["text_encoder"](ids)[0]
    scheduler = DDIMScheduler.from_config(st.scheduler.config)
    outputs = []
    for i in range(0, len(low_res), batch):
        lr = low_res[i : i + batch].float()
        n, (h, w) = lr.shape[0], lr.shape[-2:]
        g = torch.Generator().manual_seed(seed + i)
        level = torch.full((n,), int(noise_level), dtype=torch.long)
        cond = st.condition(low_sched.add_noise(lr, torch.randn(lr.shape, generator=g), level))
        latents = torch.randn((n, st.unet.config.out_channels, h // st.factor, w // st.factor), generator=g)
        scheduler.set_timesteps(steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = torch.cat([scheduler.scale_model_input(latents, t), cond], dim=1)
            pred = st.unet(x, t, encoder_hidden_states=prompt.expand(n, -1, -1), class_labels=level).sample
            latents = scheduler.step(pred, t, latents).prev_sample
        outputs.append(_quantize(vae.decode(latents / vae.config.scaling_factor).sample))
    return torch.cat(outputs)


def evaluate_scale_teacher(
    folder: str | Path,
    num_inference_steps: int | None = None,
    noise_level: int | None = None,
    seed: int = 0,
    max_patches: int | None = None,
) -> dict:
    """``evaluate`` for a scale teacher: the same held-out HR patches, its input their ``downscale`` at its scale;
    bicubic from that input and, for reference, bicubic x4 (the x4 teacher's row)."""
    st = load_scale_teacher(folder, with_base=True)
    steps = num_inference_steps or st.info.get("num_inference_steps", 20)
    noise_level = st.noise_level if noise_level is None else noise_level
    pairs = grid_pairs("heldout")
    hr, names = pairs.hr[:max_patches], pairs.names[:max_patches]
    low = downscale(hr, st.scale)
    t0 = time.time()
    pred = upscale_scale_teacher(st, low, steps, noise_level, seed)
    seconds = time.time() - t0
    result = {
        "patches": len(hr),
        "hr_size": hr.shape[-1],
        "scale": st.scale,
        "num_inference_steps": steps,
        "noise_level": noise_level,
        "teacher": dict(_scores(pred, hr, names), seconds_per_patch=round(seconds / len(hr), 4)),
        f"bicubic_x{st.scale}": _scores(_quantize(bicubic_upscale(low, st.scale)), hr, names),
        f"bicubic_x{SCALE}": _scores(_quantize(bicubic_upscale(pairs.lr[:max_patches])), hr, names),
    }
    print(f"[evaluate] {json.dumps(result)}", flush=True)
    return result
