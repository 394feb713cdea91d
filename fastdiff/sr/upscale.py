"""``fastdiff upscale EXPORT IMAGE --out FILE``: run an upscaler export (its ``pipeline/`` and the call recorded in
``fastdiff.json``) on an image of any size.

Input: any file PIL reads; grey, palette and 16-bit images become RGB, transparency is composited over white. The
UNet accepts low-resolution sides that are multiples of its downsampling factor (2^(levels - 1)), and the pipeline's
image processor would resize other sides down to multiples of the VAE's factor: other sizes are padded by reflection
and the output cropped back, so the output is exactly 4x the input. Images larger than ``tile`` pixels on a side are upscaled in
overlapping tiles blended linearly across the overlap; images over ``max_pixels`` are refused with a message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .data import from_pil, to_pil

MAX_PIXELS = 4096 * 4096  # of the input: larger inputs are refused (the output is 16x that)


class UpscaleError(ValueError):
    """An input that cannot be upscaled: not an image, unreadable, too large."""


def load_image(path: str | Path) -> Image.Image:
    """An input image as 8-bit RGB; a clear error for a missing, non-image or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except UnidentifiedImageError:
        raise UpscaleError(f"{path} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UpscaleError(f"{path} could not be decoded (corrupt or truncated image: {e})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette, 16-bit and float images as 8-bit RGB; alpha composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = (
            65535.0
            if image.mode != "F" and a.max() > 255
            else (1.0 if image.mode == "F" and a.max() <= 1 else 255.0)
        )
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _multiple(pipe) -> int:
    """The side multiple the pipeline keeps as it is: its UNet's downsampling factor and the image processor's
    (which would otherwise resize the input down to its multiple)."""
    import math

    return math.lcm(
        2 ** (len(pipe.unet.config.block_out_channels) - 1), pipe.image_processor.config.vae_scale_factor
    )


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad ``[1, 3, h, w]`` on the bottom/right to multiples of ``multiple`` (replicate when too small)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _run(pipe, x: torch.Tensor, call: dict, seed: int) -> torch.Tensor:
    """One padded LR tile ``[1, 3, h, w]`` in [-1, 1] -> its 4x output in [-1, 1]."""
    h, w = x.shape[-2:]
    padded = _pad_to(x, _multiple(pipe))
    out = pipe(
        prompt="",
        image=to_pil(padded[0]),
        **call,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    out = out * 2 - 1
    scale = out.shape[-1] // padded.shape[-1]
    return out[..., : h * scale, : w * scale]


def _ramp(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """Blend weights along one side of a tile: linear ramps over the overlap except at the image border."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not first:
            w[:overlap] = ramp
        if not last:
            w[-overlap:] = ramp.flip(0)
    return w


@torch.no_grad()
def upscale_image(
    pipe, image: Image.Image, call: dict, seed: int = 0, tile: int = 128, overlap: int = 16,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:  # fmt: skip
    """Upscale a PIL image with ``pipe`` called with ``call`` (e.g. ``num_inference_steps``, ``guidance_scale``,
    ``noise_level``), tiling inputs with a side over ``tile``."""
    image = to_rgb(image)
    w, h = image.size
    if w * h > max_pixels:
        raise UpscaleError(
            f"the image is {w}x{h} ({w * h:,} pixels); the limit is {max_pixels:,} input pixels (its output "
            "would be 16x that): crop or downscale it first"
        )
    if tile < 2 * overlap + 1:
        raise UpscaleError(f"tile ({tile}) must exceed twice the overlap ({overlap})")
    x = from_pil(image)[None]
    if max(w, h) <= tile:
        return to_pil(_run(pipe, x, call, seed)[0])
    step = tile - overlap
    tops = list(range(0, max(h - tile, 0) + 1, step)) or [0]
    lefts = list(range(0, max(w - tile, 0) + 1, step)) or [0]
    if tops[-1] + tile < h:
        tops.append(h - tile)
    if lefts[-1] + tile < w:
        lefts.append(w - tile)
    out, weight, scale = None, None, None
    for i, top in enumerate(tops):
        for j, left in enumerate(lefts):
            part = x[..., top : top + tile, left : left + tile]
            y = _run(pipe, part, call, seed + i * len(lefts) + j)
            if out is None:
                scale = y.shape[-1] // part.shape[-1]
                out = torch.zeros(1, 3, h * scale, w * scale)
                weight = torch.zeros(1, 1, h * scale, w * scale)
            th, tw = y.shape[-2:]
            wy = _ramp(th, overlap * scale, i == 0, i == len(tops) - 1)
            wx = _ramp(tw, overlap * scale, j == 0, j == len(lefts) - 1)
            m = (wy[:, None] * wx[None, :])[None, None]
            t0, l0 = top * scale, left * scale
            out[..., t0 : t0 + th, l0 : l0 + tw] += y * m
            weight[..., t0 : t0 + th, l0 : l0 + tw] += m
    return to_pil((out / weight.clamp_min(1e-8))[0])


def load_upscaler(export_dir: str | Path):
    """(pipeline, call kwargs) of an upscaler export, as ``fastdiff.json`` records them."""
    from ..recipe import Recipe, apply_scheduler, load_step_pipeline, read_recipe

    folder = Path(export_dir)
    data = read_recipe(folder)
    step = Recipe.from_json(data).for_steps()
    pipe = load_step_pipeline(folder, step, data, use_safetensors=True)
    if type(pipe).__name__ != "StableDiffusionUpscalePipeline":
        raise UpscaleError(f"{folder} holds a {type(pipe).__name__}, not an upscaler export")
    apply_scheduler(pipe, step)
    pipe.set_progress_bar_config(disable=True)
    return pipe, step.call_kwargs()


def upscale_file(export_dir, image_path, out, seed: int = 0, tile: int = 128, max_pixels: int = MAX_PIXELS):
    """``fastdiff upscale``: read, upscale and save; returns the output path."""
    image = load_image(image_path)  # bad input fails before the pipeline loads
    pipe, call = load_upscaler(export_dir)
    result = upscale_image(pipe, image, call, seed=seed, tile=tile, max_pixels=max_pixels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    return out
