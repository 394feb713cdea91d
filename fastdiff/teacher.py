"""The teacher: a local diffusers pipeline folder (SD1.5, SDXL or the SD x4 upscaler) read as conditioning +
denoisers + VAE.

An image-conditioned teacher (``family == "sd-x4"``, ``StableDiffusionUpscalePipeline``) takes a low-resolution
image besides the prompt: ``image_cond`` builds its conditioning exactly as the pipeline does (the image noised in
pixel space by ``low_res_scheduler`` at ``noise_level``, concatenated to the latents, the noise level as class
label), and ``example_inputs`` / ``call_cond`` give exports and validation a pipeline call and fastdiff's matching
condition for any family.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .models.denoiser import Cond, UNetDenoiser

FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionUpscalePipeline": "sd-x4",
}
DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's default noise_level


class TeacherError(ValueError):
    """The teacher path is missing, not a diffusers pipeline, or of an unsupported kind."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_pipeline_folder(path: str | os.PathLike, families=FAMILIES) -> str:
    """Validate a teacher path and return its pipeline class name; raise TeacherError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        looks_like_hub_id = isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/"))
        if looks_like_hub_id and _offline():
            raise TeacherError(
                f"teacher '{path}' is not a local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1): "
                "download the pipeline once (e.g. `huggingface-cli download` or `save_pretrained`) and pass its folder"
            )
        raise TeacherError(f"teacher folder not found: {path}")
    index = p / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"{path} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        cls = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise TeacherError(f"{index} is not a valid diffusers model_index.json ({e})") from None
    if cls not in families:
        raise TeacherError(f"{path} holds a {cls}; supported teachers: {', '.join(families)}")
    return cls


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
_HUB_CACHE_DIR = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")


def teacher_hub_id(name: str, path: str | os.PathLike) -> str | None:
    """The model hub id of a teacher, where one can be told: ``name`` (the teacher as given) when it has the form
    ``owner/model`` (one slash, not starting with ``.`` or ``/``), or the ``models--owner--model`` folder of a
    Hugging Face cache snapshot among the parts of its resolved ``path``; else None (a local folder of unknown
    origin)."""
    if _HUB_ID.match(str(name)) and ".." not in str(name):
        return str(name)
    for part in reversed(Path(path).resolve().parts):
        if m := _HUB_CACHE_DIR.match(part):
            return f"{m.group(1)}/{m.group(2)}"
    return None


def teacher_license(path: str | os.PathLike) -> dict:
    """The teacher's license as a model card states it: ``license`` (with ``license_name`` and ``license_link``
    where given, as for ``license: other``) from the front matter of the folder's README.md (hub downloads carry
    it), else the ``license`` of its ``fastdiff_teacher.json``; {} when neither says."""
    import yaml

    folder = Path(path)
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text[3:].split("\n---", 1)[0])
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict) and meta.get("license"):
                return {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
    info = folder / "fastdiff_teacher.json"
    if info.is_file():
        license = json.loads(info.read_text()).get("license")
        if license:
            return {"license": str(license)}
    return {}


class Teacher:
    """A loaded teacher pipeline.

    Args:
        path: local diffusers folder of a StableDiffusionPipeline, StableDiffusionXLPipeline or
            StableDiffusionUpscalePipeline.
        device: where the networks live.
        dtype: dtype of the frozen networks (the trainer casts trainable copies to float32).
    """

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        from diffusers import DiffusionPipeline

        cls = check_pipeline_folder(path)
        self.path = str(path)
        self.family = FAMILIES[cls]
        self.pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        self.dtype = dtype
        for name, module in self.pipeline.components.items():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
                if name != "unet":  # the UNet is placed by whoever owns the trainable copies
                    module.to(self.device)
        self.unet.to(self.device)
        sched = self.pipeline.scheduler
        self.alphas_cumprod = sched.alphas_cumprod.float().clone()
        self.prediction_type = sched.config.prediction_type
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.config.sample_size * self.vae_scale
        self._cache: dict[str, Cond] = {}

    def to_float32(self) -> None:
        """Upcast every component (e.g. after mixed-precision training, for an exact export check)."""
        for module in self.pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(torch.float32)
        self.dtype = torch.float32
        self._cache.clear()

    # --- components -------------------------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def pipeline_class(self):
        return type(self.pipeline)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.resolution
        if res % self.vae_scale:
            raise ValueError(
                f"resolution {res} is not a multiple of the VAE's downsampling factor {self.vae_scale}"
            )
        return (self.unet.config.out_channels, res // self.vae_scale, res // self.vae_scale)

    @property
    def image_conditioned(self) -> bool:
        """Whether the UNet takes a conditioning image besides the latents (the x4 upscaler)."""
        return self.family == "sd-x4"

    @property
    def noise_level(self) -> int:
        """The upscaler's noise level the teacher is meant to run at: its folder's ``fastdiff_teacher.json`` says
        (fastdiff's bundled SR teacher), else the pipeline's default 20."""
        info = Path(self.path) / "fastdiff_teacher.json"
        if info.is_file():
            return int(json.loads(info.read_text()).get("noise_level", DEFAULT_NOISE_LEVEL))
        return DEFAULT_NOISE_LEVEL

    def denoiser(self, unet=None, adapter: str | None = "*") -> UNetDenoiser:
        """Read ``unet`` (default: the teacher's own) as an x0 predictor speaking the teacher's schedule."""
        return UNetDenoiser(
            unet if unet is not None else self.unet, self.alphas_cumprod, self.prediction_type, adapter
        )

    # --- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """Text conditioning for a batch of prompts (cached per prompt, kept on the teacher's device)."""
        res = resolution or self.resolution
        missing = [p for p in dict.fromkeys(prompts) if (p, res) not in self._cache]
        if missing:
            for p, c in zip(missing, self._encode(missing, res)):
                self._cache[(p, res)] = c
        conds = [self._cache[(p, res)] for p in prompts]
        return Cond(
            prompt_embeds=torch.stack([c.prompt_embeds for c in conds]),
            pooled=None if conds[0].pooled is None else torch.stack([c.pooled for c in conds]),
            time_ids=None if conds[0].time_ids is None else torch.stack([c.time_ids for c in conds]),
        )

    def _encode(self, prompts: list[str], res: int) -> list[Cond]:
        pipe = self.pipeline
        if self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, device=self.device, do_classifier_free_guidance=False
            )
            time_ids = pipe._get_add_time_ids(
                (res, res),
                (0, 0),
                (res, res),
                dtype=embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).to(self.device)
            return [Cond(e, p, time_ids[0]) for e, p in zip(embeds, pooled)]
        embeds, _ = pipe.encode_prompt(prompts, self.device, 1, False)
        return [Cond(e) for e in embeds]

    def unconditional(self, latent_shape) -> Callable[[int], Cond]:
        """``null_cond`` at the resolution of ``latent_shape``, as a function of the batch size: CFG's unconditional
        branch must carry the same SDXL size conditioning (time ids) as the batch it is combined with."""
        return functools.partial(self.null_cond, resolution=latent_shape[-1] * self.vae_scale)

    def null_cond(self, n: int, resolution: int | None = None) -> Cond:
        """The unconditional input for CFG: zeroed embeddings for SDXL (as its pipeline and DMD2 do), "" for SD1.5."""
        if self.family == "sdxl":
            c = self.encode([""], resolution)
            c = Cond(torch.zeros_like(c.prompt_embeds), torch.zeros_like(c.pooled), c.time_ids)
        else:
            c = self.encode([""], resolution)
        return c[[0] * n]

    @torch.no_grad()
    def image_cond(
        self, low_res: torch.Tensor, noise_level: int, generator: torch.Generator | None = None, noise=None
    ) -> Cond:
        """The x4 upscaler's condition for low-resolution images ``[n, 3, h, w]`` in [-1, 1], as its pipeline builds
        it: the empty prompt, the image plus ``low_res_scheduler`` noise at ``noise_level`` (``noise``, or drawn from
        ``generator`` as the pipeline draws it), the noise level as class label."""
        if not self.image_conditioned:
            raise ValueError(f"a {self.family} teacher takes no conditioning image")
        from diffusers.utils.torch_utils import randn_tensor

        n = low_res.shape[0]
        low_res = low_res.to(self.device, torch.float32)
        if noise is None:
            noise = randn_tensor(low_res.shape, generator=generator, device=self.device, dtype=torch.float32)
        level = torch.full((n,), int(noise_level), dtype=torch.long, device=self.device)
        image = self.pipeline.low_res_scheduler.add_noise(low_res, noise.to(low_res), level)
        text = self.encode([""] * n)
        return Cond(text.prompt_embeds, image=image, class_labels=level)

    def example_inputs(self, prompts: list[str], resolution: int | None = None) -> list[dict]:
        """Pipeline inputs for export checks, sample grids and validation: one per prompt; an image-conditioned
        teacher gets the empty prompt and held-out low-resolution patches of the bundled photographs instead (HR
        side ``resolution``, default the teacher's)."""
        if not self.image_conditioned:
            return [{"prompt": p} for p in prompts]
        from .sr.data import example_low_res

        size = resolution or self.resolution
        return [{"prompt": "", "image": image} for image in example_low_res(len(prompts), size)]

    def call_cond(self, inputs: dict, call_kwargs: dict, generator: torch.Generator | None = None) -> Cond:
        """fastdiff's condition for one pipeline call ``pipe(**inputs, **call_kwargs, generator=generator)``,
        drawing from ``generator`` what the pipeline draws before its latents (the upscaler's image noise), so that
        the generator's next draw gives the pipeline's initial latents."""
        if not self.image_conditioned:
            return self.encode([inputs["prompt"]])
        from .sr.data import from_pil

        level = call_kwargs.get("noise_level", DEFAULT_NOISE_LEVEL)
        return self.image_cond(from_pil(inputs["image"])[None], level, generator)

    # --- pixels <-> latents -----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], float32 [B, 3, H, W] (decoded in float32, as diffusers' upcast does)."""
        vae = self.vae
        cfg = vae.config
        z = latents.float() / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        dtype = vae.dtype
        if dtype != torch.float32:
            vae.to(torch.float32)
        try:
            img = vae.decode(z.to(self.device), return_dict=False)[0]
        finally:
            if dtype != torch.float32:
                vae.to(dtype)
        return (img / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (a sample of the VAE posterior)."""
        return self.sample_latents(*self.latent_posterior(pixels), generator=generator)

    @torch.no_grad()
    def latent_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> the VAE posterior's (mean, std), unscaled: what ``cache_latents`` keeps."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean, std, generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent drawn from the posterior N(mean, std²)."""
        from diffusers.utils.torch_utils import randn_tensor

        z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor
