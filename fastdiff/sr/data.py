"""Real photographs that ship inside installed packages, as x4 super-resolution pairs (offline, no downloads).

Images: the photographs in scikit-image's package folder ``skimage/data/`` (read by file name with PIL, so no
pooch fetcher is ever involved) and scikit-learn's two sample images (``load_sample_image``). Synthetic or
unsuitable files there are left out: colorwheel (``color.png``), chessboards, horse silhouette, logo, phantom,
the 25x25 lfw faces, the GIF/TIFF stacks, and the motion-blurred clock (it would teach blur).

Split (fixed, by image; held-out images are never trained on): ``HELD_OUT`` = chelsea and flower (colour),
camera and coins (grey); the other 16 are ``TRAIN``.

Tensors are float32 ``[3, H, W]`` (or ``[N, 3, H, W]``) in [-1, 1]; grey images are replicated to 3 channels.
Degradation (the one used everywhere): LR = ``downscale(HR)``: torch ``F.interpolate(mode="bicubic",
antialias=True)`` to 1/4 of the size, clamped to [-1, 1] and rounded to 8-bit levels, so an LR patch is exactly
the PIL image a user would pass to ``StableDiffusionUpscalePipeline``. HR patches are ``PATCH_SIZE`` (64) squares
cut on a deterministic grid (evaluation) or at seeded random positions (training); LR is each HR patch downscaled.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALE = 4
PATCH_SIZE = 64

# name -> (source, file name); "skimage": skimage/data/<file>, "sklearn": sklearn's load_sample_image(<file>).
PHOTOS: dict[str, tuple[str, str]] = {
    # colour
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "ihc.png"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "retina": ("skimage", "retina.jpg"),
    "rocket": ("skimage", "rocket.jpg"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    # grey
    "brick": ("skimage", "brick.png"),
    "camera": ("skimage", "camera.png"),
    "cell": ("skimage", "cell.png"),
    "coins": ("skimage", "coins.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "microaneurysms": ("skimage", "microaneurysms.png"),
    "moon": ("skimage", "moon.png"),
    "page": ("skimage", "page.png"),
    "text": ("skimage", "text.png"),
}
HELD_OUT = ("chelsea", "flower", "camera", "coins")
TRAIN = tuple(name for name in PHOTOS if name not in HELD_OUT)
SPLITS = {"train": TRAIN, "heldout": HELD_OUT}


@dataclass
class SRPairs:
    """HR patches ``[N, 3, S, S]``, their LR versions ``[N, 3, S/4, S/4]`` (both in [-1, 1]) and each patch's
    source photo."""

    hr: torch.Tensor
    lr: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return self.hr.shape[0]


# ---- images <-> tensors ----


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode: grey, RGBA, palette ...) as an RGB tensor ``[3, H, W]`` in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def to_pil(x: torch.Tensor) -> Image.Image:
    """An RGB tensor ``[3, H, W]`` in [-1, 1] as an 8-bit PIL image."""
    array = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (pip install -e . installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _load_photo(name: str) -> torch.Tensor:
    source, file = PHOTOS[name]
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return from_pil(Image.fromarray(load_sample_image(file)))
    with Image.open(_package_dir("skimage") / "data" / file) as image:
        return from_pil(image)


def load_photo(name: str) -> torch.Tensor:
    """One bundled photograph as ``[3, H, W]`` in [-1, 1] (cached; the caller gets a copy)."""
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    return _load_photo(name).clone()


def split_names(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return SPLITS[split]


# ---- degradation and baseline ----


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1)


def downscale(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """LR = HR downscaled ``scale``x with antialiased bicubic, clamped and rounded to 8-bit levels.

    Args:
        hr (`torch.Tensor`): ``[N, 3, H, W]`` or ``[3, H, W]`` in [-1, 1]; H and W divisible by ``scale``.
        scale (`int`, defaults to 4).
    """
    squeeze = hr.dim() == 3
    x = hr.unsqueeze(0) if squeeze else hr
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by the scale {scale}")
    lr = F.interpolate(
        x.float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False
    )
    lr = _quantize(lr)
    return lr[0] if squeeze else lr


def bicubic_upscale(lr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The baseline: LR upscaled ``scale``x with bicubic interpolation, clamped to [-1, 1] (not quantized)."""
    squeeze = lr.dim() == 3
    x = lr.unsqueeze(0) if squeeze else lr
    hr = F.interpolate(x.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    return hr[0] if squeeze else hr


# ---- patches ----


def grid_patches(image: torch.Tensor, size: int = PATCH_SIZE, stride: int | None = None) -> torch.Tensor:
    """``size``-square patches of ``[3, H, W]`` on a deterministic grid (step ``stride``, default ``size``: no
    overlap) centred in the image; ``[N, 3, size, size]``, N = 0 for an image smaller than ``size``."""
    stride = stride or size
    h, w = image.shape[-2:]
    if h < size or w < size:
        return image.new_zeros((0, image.shape[0], size, size))
    rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
    top = (h - (size + (rows - 1) * stride)) // 2
    left = (w - (size + (cols - 1) * stride)) // 2
    patches = [
        image[:, top + r * stride : top + r * stride + size, left + c * stride : left + c * stride + size]
        for r in range(rows)
        for c in range(cols)
    ]
    return torch.stack(patches)


def grid_pairs(
    split: str = "heldout", size: int = PATCH_SIZE, stride: int | None = None, scale: int = SCALE
) -> SRPairs:
    """Every grid patch of a split's photos with its LR version (the evaluation set for ``split="heldout"``)."""
    if size % scale:
        raise ValueError(f"patch size {size} is not divisible by the scale {scale}")
    hr, names = [], []
    for name in split_names(split):
        patches = grid_patches(_load_photo(name), size, stride)
        hr.append(patches)
        names += [name] * len(patches)
    hr = torch.cat(hr)
    return SRPairs(hr=hr, lr=downscale(hr, scale), names=names)


def random_pairs(
    n: int, generator: torch.Generator, split: str = "train", size: int = PATCH_SIZE, scale: int = SCALE
) -> SRPairs:
    """``n`` training pairs: photo drawn uniformly among the split's photos at least ``size`` on each side, then
    a uniformly placed ``size`` crop; a pure function of the generator's state."""
    if size % scale:
        raise ValueError(f"patch size {size} is not divisible by the scale {scale}")
    photos = [(name, _load_photo(name)) for name in split_names(split)]
    photos = [(name, image) for name, image in photos if min(image.shape[-2:]) >= size]
    if not photos:
        raise ValueError(f"no {split} photo is at least {size}x{size}")
    hr, names = [], []
    for _ in range(n):
        name, image = photos[int(torch.randint(len(photos), (), generator=generator))]
        h, w = image.shape[-2:]
        top = int(torch.randint(h - size + 1, (), generator=generator))
        left = int(torch.randint(w - size + 1, (), generator=generator))
        hr.append(image[:, top : top + size, left : left + size])
        names.append(name)
    hr = torch.stack(hr)
    return SRPairs(hr=hr, lr=downscale(hr, scale), names=names)


def example_pairs(n: int, size: int = PATCH_SIZE, scale: int = SCALE) -> SRPairs:
    """``n`` held-out pairs spread over the held-out photos (a fixed choice: sample grids, export checks)."""
    pairs = grid_pairs("heldout", size, scale=scale)
    pick = torch.linspace(0, len(pairs) - 1, n).round().long() if n > 1 else torch.tensor([len(pairs) // 2])
    return SRPairs(hr=pairs.hr[pick], lr=pairs.lr[pick], names=[pairs.names[i] for i in pick.tolist()])


def example_low_res(n: int, size: int = PATCH_SIZE, scale: int = SCALE) -> list[Image.Image]:
    """The LR images of ``example_pairs`` as PIL images (what a user passes to the upscale pipeline)."""
    return [to_pil(lr) for lr in example_pairs(n, size, scale).lr]


# ---- a teacher at a smaller scale (YONOS-SR's x2 teacher) ----


def space_to_depth(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``[N, 3, f h, f w]`` -> ``[N, 3 f², h, w]`` (``F.pixel_unshuffle``: output channel ``c f² + i f + j`` is pixel
    (i, j) of each f x f block of colour c): a larger conditioning image on the latent grid, every pixel kept."""
    return image if factor == 1 else F.pixel_unshuffle(image, factor)


def scale_pairs(hr: torch.Tensor, scales: tuple[int, ...] = (2, SCALE)) -> dict[int, torch.Tensor]:
    """The LR versions of HR patches ``[N, 3, S, S]`` at each magnification (``downscale``): ``{2: [N, 3, S/2, S/2],
    4: [N, 3, S/4, S/4]}`` for the default; the same degradation at every scale."""
    return {s: downscale(hr, s) for s in scales}
