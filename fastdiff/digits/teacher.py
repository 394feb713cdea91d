"""The bundled teacher: a small SDXL-architecture pipeline trained from scratch on scikit-learn's digits.

``python train/teacher.py --config assets/configs/teacher_digits.yaml`` writes ``assets/teachers/digits-sdxl/``,
a standard ``StableDiffusionXLPipeline`` folder that plain diffusers loads offline and samples at 25 steps with
CFG. Three stages, all seeded:

1. VAE: an ``AutoencoderKL`` (4 latent channels, downsampling 4: 32x32 images -> 8x8 latents) trained on the
   fixed train split (MSE reconstruction + small KL); ``scaling_factor`` = 1 / std of the posterior samples, so
   scaled latents have unit variance.
2. Text encoders: two tiny CLIP text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``) over the
   in-memory byte-level tokenizer, random-init from the seed and frozen, like SD freezes its encoders. Their
   token embeddings are drawn at std ``text.embedding_std`` (1) instead of CLIP's 0.02 so that the penultimate
   hidden states the pipeline feeds the UNet have unit scale (letters, hence digit names, stay distinct).
   The embeddings of every (template, digit) prompt are computed once with the pipeline's own ``encode_prompt``.
3. UNet: ``UNet2DConditionModel`` with SDXL conditioning (``text_time``: pooled text embeds + the
   (32, 32, 0, 0, 32, 32) time ids), eps-prediction on SD/SDXL ``scaled_linear`` betas; a random prompt template
   per sample and zeroed prompt + pooled embeddings 10% of the time (SDXL's unconditional input with
   ``force_zeros_for_empty_prompt``, so CFG works). AdamW, optional min-SNR weighting, EMA of the weights (the EMA
   is what is saved). The stage checkpoints every few minutes and ``--resume`` continues it exactly.

The pipeline is saved with an ``EulerDiscreteScheduler`` at ``timestep_spacing="trailing"`` (the default
"leading" never starts at t=999), plus ``fastdiff_teacher.json`` (guidance scale, steps, wall times, losses,
config) and ``samples.png`` (rows = digits 0..9) from a self-check that reloads the folder with plain diffusers.

On shared CPU cores run with ``OMP_WAIT_POLICY=PASSIVE`` (``train/teacher.py`` sets it before torch loads): with
OpenMP's default spin-waiting, 2 threads ran ~30x slower per step whenever another process held a core.
``max_minutes`` caps the wall time of a run on a busy machine by stopping the UNet stage early.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import ConfigError
from ..schedule import add_noise, snr
from ..teacher_training import folder_mb, load_recipe, lr_scale, num_params
from .data import NAMES, TEMPLATES, load_split, prompt_for

STATE_DIR = "_train_state"  # checkpoints inside the output folder; removed when the run completes
TIME_IDS = (32, 32, 0, 0, 32, 32)  # original size, crop top-left, target size
RESERVE_MINUTES = 3.0  # of TeacherConfig.max_minutes, kept for saving and the self-check


# ------------------------------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    """Stage 1: the autoencoder (32x32 RGB <-> 4x8x8 latents with three blocks)."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3  # cosine-decayed to 10%
    kl_weight: float = 1e-5  # times the KL summed over latent elements, per image


@dataclass
class TextConfig:
    """Stage 2: the two frozen random-init CLIP text encoders (same width; the second one has a projection)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    projection_dim: int = 64
    embedding_std: float = 1.0  # std of the token embeddings (CLIP's init uses 0.02)


@dataclass
class UNetConfig:
    """Stage 3: the SDXL-conditioned UNet on 8x8 latents and its training."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # 8x8, 4x4, 2x2
    cross_attention: list[bool] = field(default_factory=lambda: [False, True, True])  # per level
    transformer_layers_per_block: list[int] = field(default_factory=lambda: [1, 1, 1])
    attention_heads: list[int] = field(default_factory=lambda: [1, 2, 4])  # diffusers' `attention_head_dim`
    layers_per_block: int = 1
    norm_num_groups: int = 16
    addition_time_embed_dim: int = 16
    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # zeroed prompt + pooled embeddings (SDXL's CFG unconditional)
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); null = plain eps MSE
    checkpoint_minutes: float = 5.0


@dataclass
class TeacherConfig:
    """Everything ``train/teacher.py`` needs; ``key=value`` overrides reach sections (``unet.steps=300``)."""

    seed: int = 0
    num_threads: int = 2
    guidance_scale: float = 1.5  # the recommended CFG, stored in fastdiff_teacher.json
    num_inference_steps: int = 25
    samples_per_digit: int = 8  # columns of samples.png
    eval_guidance_scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    eval_per_digit: int = 20  # prompt accuracy per w with fastdiff's digit classifier, if it is trained
    max_minutes: float | None = None  # wall-time cap of the whole run: the UNet stage stops early (not
    # reproducible then; stats.unet.stopped_early says so) leaving RESERVE_MINUTES for saving and the self-check
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)


def load_teacher_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> TeacherConfig:
    """Load a teacher recipe and apply ``key=value`` overrides; unknown keys raise ConfigError.

    Args:
        path: YAML file (None: the defaults).
        overrides: dotted ``key=value`` strings, values typed as YAML reads them.
    """
    return load_recipe(TeacherConfig, path, overrides)


# ------------------------------------------------------------------------------------------------- models


def build_vae(cfg: VAEConfig, seed: int):
    """A random-init AutoencoderKL for 32x32 RGB with 4 latent channels (downsampling 2**(levels-1))."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        latent_channels=4,
        sample_size=32,
    )


def build_text_encoders(cfg: TextConfig, vocab_size: int, seed: int):
    """(CLIPTextModel, CLIPTextModelWithProjection), random-init from ``seed``, frozen, eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = []
    for i, cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
        torch.manual_seed(seed + i)
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            max_position_embeddings=77,
            projection_dim=cfg.projection_dim,
            hidden_act="gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
        model = cls(config)
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb.normal_(0.0, cfg.embedding_std, generator=torch.Generator().manual_seed(seed + 10 + i))
        encoders.append(model.eval().requires_grad_(False))
    return tuple(encoders)


def build_unet(cfg: UNetConfig, text: TextConfig, seed: int):
    """A random-init UNet2DConditionModel with SDXL's text_time conditioning for 8x8 latents."""
    from diffusers import UNet2DConditionModel

    levels = {
        k: len(getattr(cfg, k))
        for k in ("block_out_channels", "cross_attention", "transformer_layers_per_block", "attention_heads")
    }
    if len(set(levels.values())) != 1:
        raise ConfigError(f"unet: the per-level lists must have one entry per level, got lengths {levels}")
    torch.manual_seed(seed)
    xattn = list(cfg.cross_attention)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in xattn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(xattn))
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        norm_num_groups=cfg.norm_num_groups,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=tuple(cfg.attention_heads),  # diffusers reads this as the number of heads
        transformer_layers_per_block=tuple(cfg.transformer_layers_per_block),
        cross_attention_dim=text.hidden_size * 2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + text.projection_dim,
    )


def build_scheduler():
    """SDXL's scheduler (scaled_linear 0.00085-0.012, eps) with trailing spacing: sampling starts at t=999."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )


# ------------------------------------------------------------------------------------------------- stages


def train_vae(cfg: VAEConfig, images: torch.Tensor, seed: int, log_every: int = 100):
    """Stage 1: fit the autoencoder to ``images`` ([N, 3, 32, 32] in [-1, 1]) and set its scaling_factor.

    Args:
        cfg: the VAE section of the recipe.
        images: training images.
        seed: seeds the init and the batch order.
        log_every: steps between loss records.

    Returns:
        (vae in eval mode, stats dict with the loss curve and the latent statistics).
    """
    vae = build_vae(cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    curve, run = [], []
    bar = tqdm(range(cfg.steps), desc="vae", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_scale(step, cfg.steps, floor=0.1)
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(mse.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, sum(run) / len(run)))
            bar.set_postfix(mse=f"{curve[-1][1]:.4f}")
            run = []
    vae.eval().requires_grad_(False)
    mean, std = encode_posterior(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    stats = {
        "mse_curve": curve,
        "scaling_factor": vae.config.scaling_factor,
        "latent_channel_mean": z.mean((0, 2, 3)).tolist(),
        "latent_channel_std": z.std((0, 2, 3)).tolist(),
        "posterior_std_mean": float(std.mean()),
    }
    return vae, stats


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ([N, 4, 8, 8] each, unscaled) of ``images`` in [-1, 1]."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_test_psnr(vae, images: torch.Tensor) -> float:
    """PSNR (dB, images in [0, 1]) of the posterior-mean reconstruction."""
    mean, _ = encode_posterior(vae, images)
    rec = torch.cat([vae.decode(mean[i : i + 256]).sample for i in range(0, len(mean), 256)])
    mse = F.mse_loss(rec.clamp(-1, 1) / 2, images / 2).item()
    return 10 * math.log10(1.0 / mse)


def assemble_pipeline(vae, text_encoders, unet):
    """The StableDiffusionXLPipeline around the parts (in-memory tokenizers, trailing Euler scheduler)."""
    from diffusers import StableDiffusionXLPipeline

    from ..models.tiny import make_tokenizer

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


@torch.no_grad()
def prompt_table(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conditioning of all (template, digit) prompts, row ``template * 10 + digit``, exactly as the pipeline
    computes it: (prompt_embeds [P, 77, D], pooled [P, Dp], time_ids [6])."""
    prompts = [prompt_for(d, k) for k in range(len(TEMPLATES)) for d in range(len(NAMES))]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    time_ids = pipe._get_add_time_ids(
        TIME_IDS[:2],
        TIME_IDS[2:4],
        TIME_IDS[4:],
        dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    return embeds, pooled, time_ids[0]


class _EMA:
    """Exponential moving average of parameters with diffusers' warmup: decay_t = min(d, (1+t)/(10+t))."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)


def _save_tensors(tensors: dict, path: Path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_unet_checkpoint(state_dir: Path, unet, ema: _EMA, opt, gen, state: dict):
    """Atomically replace ``state_dir/unet``: weights, EMA, optimizer + RNG (safetensors) and state.json."""
    new, final = state_dir / "unet.new", state_dir / "unet"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    _save_tensors(unet.state_dict(), new / "unet.safetensors")
    _save_tensors({str(i): t for i, t in enumerate(ema.shadow)}, new / "ema.safetensors")
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": torch.as_tensor(v) for i, s in osd["state"].items() for k, v in s.items()}
    tensors["rng"] = gen.get_state()
    _save_tensors(tensors, new / "optim.safetensors")
    state = dict(state, param_groups=osd["param_groups"])
    (new / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    new.rename(final)


def _load_unet_checkpoint(state_dir: Path, unet, ema: _EMA, opt, gen) -> dict | None:
    """Restore what ``_save_unet_checkpoint`` wrote; None if there is no checkpoint."""
    from safetensors.torch import load_file

    ckpt = next(
        (d for d in (state_dir / "unet", state_dir / "unet.new") if (d / "state.json").is_file()), None
    )
    if ckpt is None:
        return None
    state = json.loads((ckpt / "state.json").read_text())
    unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
    shadow = load_file(str(ckpt / "ema.safetensors"))
    for i, t in enumerate(ema.shadow):
        t.copy_(shadow[str(i)])
    tensors = load_file(str(ckpt / "optim.safetensors"))
    gen.set_state(tensors.pop("rng"))
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


def train_unet(
    cfg: UNetConfig,
    pipe,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    state_dir: Path | None = None,
    resume: bool = False,
    deadline: float | None = None,
    log_every: int = 50,
) -> dict:
    """Stage 3: train ``pipe.unet`` as an eps-prediction denoiser on the scaled latents; load its EMA at the end.

    Args:
        cfg: the UNet section of the recipe.
        pipe: the assembled pipeline (its text encoders, scheduler and VAE scaling factor are used).
        latent_mean, latent_std: unscaled posterior of every training image ([N, 4, 8, 8]); a fresh posterior
            sample is drawn for each use.
        labels: digit of every training image.
        seed: seeds the batch order, noise, templates and dropout.
        state_dir: where checkpoints go (None: no checkpoints).
        resume: continue from the checkpoint in ``state_dir`` if there is one.
        deadline: a ``time.time()`` at which to stop early (None: run all steps).
        log_every: steps between loss records.

    Returns:
        stats: steps done, wall time, loss curve, whether the deadline stopped the run.
    """
    unet = pipe.unet.train().requires_grad_(True)
    embeds, pooled, time_ids = prompt_table(pipe)
    n_templates = len(TEMPLATES)
    acp = pipe.scheduler.alphas_cumprod.float()
    scale = pipe.vae.config.scaling_factor
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = _EMA(params, cfg.ema_decay)
    gen = torch.Generator().manual_seed(seed)
    state = {"step": 0, "elapsed_s": 0.0, "curve": []}
    if resume and state_dir is not None:
        loaded = _load_unet_checkpoint(state_dir, unet, ema, opt, gen)
        if loaded is not None:
            state = loaded
            print(f"resumed the UNet stage at step {state['step']} ({state['elapsed_s'] / 60:.1f} min done)")
    start = time.time() - state["elapsed_s"]
    last_ckpt = time.time()
    stopped_early = False
    run: list[float] = []
    added_time = time_ids.expand(cfg.batch_size, -1)
    bar = tqdm(
        range(state["step"], cfg.steps), desc="unet", initial=state["step"], total=cfg.steps, mininterval=10
    )
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_scale(step, cfg.steps, cfg.warmup_steps)
        b = cfg.batch_size
        idx = torch.randint(len(labels), (b,), generator=gen)
        row = torch.randint(n_templates, (b,), generator=gen) * 10 + labels[idx]
        keep = (torch.rand(b, generator=gen) >= cfg.uncond_prob).float()
        mu, sd = latent_mean[idx], latent_std[idx]
        z0 = (mu + sd * torch.randn(mu.shape, generator=gen)) * scale
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(acp), (b,), generator=gen)
        z_t = add_noise(z0, eps, t, acp)
        cond = embeds[row] * keep[:, None, None]
        text_embeds = pooled[row] * keep[:, None]
        pred = unet(
            z_t, t, cond, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": added_time}
        ).sample
        per_sample = (pred - eps).pow(2).mean((1, 2, 3))
        if cfg.snr_gamma is not None:
            s = snr(acp, t)
            per_sample = per_sample * s.clamp(max=cfg.snr_gamma) / s
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(step)
        run.append(loss.item())
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            state["curve"].append((done, sum(run) / len(run)))
            bar.set_postfix(loss=f"{state['curve'][-1][1]:.4f}")
            run = []
        state["step"], state["elapsed_s"] = done, time.time() - start
        if deadline is not None and time.time() > deadline and done < cfg.steps:
            stopped_early = True
            print(f"max_minutes reached: stopping the UNet stage at step {done}/{cfg.steps}")
            break
        if state_dir is not None and time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            _save_unet_checkpoint(state_dir, unet, ema, opt, gen, state)
            last_ckpt = time.time()
            print(f"checkpoint at step {done} ({state['elapsed_s'] / 60:.1f} min)", flush=True)
    bar.close()
    with torch.no_grad():
        for p, e in zip(params, ema.shadow):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    return {
        "steps": state["step"],
        "wall_s": round(state["elapsed_s"], 1),
        "steps_per_s": round(state["step"] / max(state["elapsed_s"], 1e-9), 3),
        "loss_curve": state["curve"],
        "stopped_early": stopped_early,
    }


# ------------------------------------------------------------------------------------------------- whole run


def train_teacher(cfg: TeacherConfig, out: str | Path, resume: bool = False) -> Path:
    """Run all stages, save the pipeline folder to ``out`` and self-check it; returns ``out``.

    Args:
        cfg: the recipe.
        out: output folder (a StableDiffusionXLPipeline folder + fastdiff_teacher.json + samples.png).
        resume: reuse the trained VAE and continue the UNet stage from the checkpoint in ``out/_train_state``
            (``cfg.max_minutes`` then counts from the resumed start).
    """
    from diffusers import AutoencoderKL

    out = Path(out)
    state_dir = out / STATE_DIR
    if not resume and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    stats: dict = {"num_threads": cfg.num_threads, "stage_wall_s": {}}
    t0 = time.time()

    images, labels = load_split("train")
    vae_dir = state_dir / "vae"
    if resume and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        stats["vae"] = json.loads((state_dir / "vae_stats.json").read_text())
        print(f"resumed: trained VAE loaded from {vae_dir}")
    else:
        tv = time.time()
        vae, stats["vae"] = train_vae(cfg.vae, images, cfg.seed)
        stats["vae"]["test_psnr_db"] = round(vae_test_psnr(vae, load_split("test")[0]), 2)
        stats["vae"]["wall_s"] = round(time.time() - tv, 1)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        (state_dir / "vae_stats.json").write_text(json.dumps(stats["vae"]))
    stats["stage_wall_s"]["vae"] = stats["vae"]["wall_s"]
    print(
        f"[vae] {stats['vae']['wall_s']:.0f} s, test PSNR {stats['vae']['test_psnr_db']} dB, "
        f"scaling_factor {vae.config.scaling_factor:.4f}",
        flush=True,
    )

    from ..models.tiny import make_tokenizer

    text_encoders = build_text_encoders(cfg.text, len(make_tokenizer()), cfg.seed + 100)
    unet = build_unet(cfg.unet, cfg.text, cfg.seed + 200)
    pipe = assemble_pipeline(vae, text_encoders, unet)
    stats["params"] = {
        "vae": num_params(vae),
        "text_encoder": num_params(text_encoders[0]),
        "text_encoder_2": num_params(text_encoders[1]),
        "unet": num_params(unet),
    }
    print(f"[params] {stats['params']}", flush=True)

    mean, std = encode_posterior(vae, images)
    deadline = None if cfg.max_minutes is None else t0 + (cfg.max_minutes - RESERVE_MINUTES) * 60
    stats["unet"] = train_unet(cfg.unet, pipe, mean, std, labels, cfg.seed + 300, state_dir, resume, deadline)
    stats["stage_wall_s"]["unet"] = stats["unet"]["wall_s"]
    print(f"[unet] {stats['unet']['steps']} steps, {stats['unet']['wall_s']:.0f} s", flush=True)

    pipe.save_pretrained(out, safe_serialization=True)
    tc = time.time()
    stats["self_check"] = self_check(out, cfg)
    stats["stage_wall_s"]["self_check"] = round(time.time() - tc, 1)
    stats["total_wall_s"] = round(time.time() - t0, 1)
    write_teacher_json(out, cfg, stats)
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"[done] {out} in {stats['total_wall_s'] / 60:.1f} min; {folder_mb(out):.1f} MB", flush=True)
    return out


def write_teacher_json(out: Path, cfg: TeacherConfig, stats: dict):
    """``fastdiff_teacher.json``: the sampling recipe, training stats and the config."""
    info = {
        "guidance_scale": cfg.guidance_scale,
        "num_inference_steps": cfg.num_inference_steps,
        "resolution": 32,
        "prompt_templates": list(TEMPLATES),
        "unconditional": "zeroed prompt and pooled embeddings (force_zeros_for_empty_prompt)",
        "train_command": "python train/teacher.py --config assets/configs/teacher_digits.yaml",
        "stats": stats,
        "config": dataclasses.asdict(cfg),
    }
    (Path(out) / "fastdiff_teacher.json").write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_teacher(
    pipeline_dir: str | Path,
    n: int,
    steps: int = 25,
    guidance_scale: float = 1.5,
    seed: int = 0,
    template: int = 0,
    pipe=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` images of every digit with plain diffusers (``StableDiffusionXLPipeline.from_pretrained``).

    Args:
        pipeline_dir: the saved folder.
        n: images per digit.
        steps: sampler steps.
        guidance_scale: CFG w (diffusers applies CFG when w > 1).
        seed: seeds the initial noise.
        template: which prompt paraphrase (``fastdiff.digits.data.TEMPLATES``).
        pipe: an already loaded pipeline (skips loading).

    Returns:
        (images [10 n, 3, 32, 32] in [0, 1], digit-major: n zeros then n ones ..., labels [10 n]).
    """
    from diffusers import StableDiffusionXLPipeline

    if pipe is None:
        pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(n)
    prompts = [prompt_for(int(y), template) for y in labels]
    images = pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return images.float().clamp(0, 1), labels


def save_grid(images: torch.Tensor, ncol: int, path: str | Path, pad: int = 2, scale: int = 2) -> Path:
    """Save [N, 3, H, W] images in [0, 1] as a PNG grid with ``ncol`` columns (nearest-upscaled by ``scale``)."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad) * 0.5
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w
        ] = img
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(arr).save(path)
    return Path(path)


def self_check(out: str | Path, cfg: TeacherConfig) -> dict:
    """Reload ``out`` with plain diffusers, save ``samples.png`` (rows = digits 0..9) at the recipe's CFG and, if
    fastdiff's digit classifier is trained, measure prompt accuracy at each of ``cfg.eval_guidance_scales``."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    w, steps = cfg.guidance_scale, cfg.num_inference_steps
    images, _ = sample_teacher(out, cfg.samples_per_digit, steps, w, seed=cfg.seed, pipe=pipe)
    save_grid(images, cfg.samples_per_digit, Path(out) / "samples.png")
    result: dict = {"samples_png": "samples.png", "guidance_scale": w, "num_inference_steps": steps}
    try:
        from .classifier import DEFAULT_PATH, accuracy, load_classifier

        classifier = load_classifier(DEFAULT_PATH) if cfg.eval_guidance_scales else None
    except (FileNotFoundError, ImportError) as e:
        print(f"[self-check] no prompt accuracy: {e}")
        classifier = None
    if classifier is not None:
        acc = {}
        for gs in cfg.eval_guidance_scales:
            imgs, labels = sample_teacher(out, cfg.eval_per_digit, steps, gs, seed=cfg.seed + 1, pipe=pipe)
            acc[str(gs)] = round(accuracy(classifier, imgs, labels), 4)
        result["prompt_accuracy"] = acc
        result["prompt_accuracy_n"] = 10 * cfg.eval_per_digit
        print(f"[self-check] prompt accuracy at {steps} steps by CFG w: {acc}", flush=True)
    return result
