"""TAD-SR's training items: HR/LR pairs with the teacher's multi-step output from the same noise, made before
training in resumable safetensors shards (``fastdiff.methods.shards``).

Folder layout::

    manifest.json             the plan (teacher, image source, patch size, noise level, sampler steps, seed, ...)
    shard-00000.safetensors   items [0, shard_size): noise [n, 4, h, w] (the student's and the teacher's input
                              latents), low_res [n, 3, h, w] and low_res_noise (the LR image and the noise the
                              upscaler's ``low_res_scheduler`` adds to it), target [n, 4, h, w] (the teacher's
                              latent output after ``steps`` deterministic DDIM steps), real [n, 4, h, w] (the HR
                              image's latent: the VAE posterior mean, scaled), item_index [n]

The HR images are random crops of the bundled photographs' train split (``fastdiff.sr.data``), or the run's
``dataset`` (an image folder, each image at the run's resolution); LR = ``downscale(HR)`` (antialiased bicubic x4,
8-bit). Shard k draws everything from a generator seeded by (seed, k): a pure function of (plan, k).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ...sr.data import downscale, random_pairs
from ..ode_pairs import ode_sample
from ..shards import (
    DTYPES,
    ShardError,
    ShardReader,
    ShardSpec,
    generate_all,
    num_shards,
    shard_range,
    teacher_fields,
)

VERSION = 1
KEYS = ("noise", "low_res", "low_res_noise", "target", "real", "item_index")
BUNDLED = "bundled-photos"


class TargetError(ShardError):
    """A target folder that does not fit the run: another plan, a missing or unreadable shard."""


def _shapes(plan: dict, n: int) -> dict[str, tuple[int, ...]]:
    latent = (n, *plan["latent_shape"])
    low = (n, 3, *plan["latent_shape"][1:])
    return {"noise": latent, "target": latent, "real": latent, "low_res": low, "low_res_noise": low}


SPEC = ShardSpec(
    "tadsr-targets",
    "items",
    KEYS,
    "item_index",
    "num_items",
    _shapes,
    "tadsr.targets",
    "fastdiff prepare --config <recipe>",
    TargetError,
)


def make_plan(
    teacher,
    source: str,
    num_items: int,
    steps: int,
    noise_level: int,
    resolution: int,
    seed: int,
    shard_size: int = 64,
    batch_size: int = 16,
    dtype: str = "float32",
) -> dict:
    """The JSON-able description of the items to make; its fingerprint keys the folder.

    Args:
        teacher: the loaded (image-conditioned) Teacher.
        source: ``"bundled-photos"`` or the dataset folder the HR images come from.
        num_items: how many items.
        steps: the teacher's deterministic DDIM steps per target.
        noise_level: the upscaler's noise level (the LR image's noise).
        resolution: HR side in pixels (LR is a quarter of it, as are the latents).
        seed: the run seed.
        shard_size / batch_size: items per shard / per teacher batch.
        dtype: float32 | float16 | bfloat16, the stored tensors.
    """
    for name, value in (("num_items", num_items), ("steps", steps), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"tadsr targets: {name} must be >= 1, got {value}")
    if batch_size < 1:
        raise ValueError(f"tadsr targets: batch_size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"tadsr targets: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return {
        "version": VERSION,
        **teacher_fields(teacher, resolution),
        "source": source if source == BUNDLED else str(Path(source).resolve()),
        "num_items": num_items,
        "shard_size": shard_size,
        "num_shards": num_shards(num_items, shard_size),
        "sampler": "ddim-trailing",
        "steps": steps,
        "noise_level": noise_level,
        "seed": seed,
        "dtype": dtype,
        "batch_size": batch_size,
    }


def high_res_images(
    plan: dict, start: int, end: int, generator: torch.Generator, dataset=None
) -> torch.Tensor:
    """The HR images of items [start, end) in [-1, 1]: bundled-photo crops drawn from ``generator``, or the
    dataset's rows ``start..end`` (wrapping around)."""
    if plan["source"] == BUNDLED:
        return random_pairs(end - start, generator, "train", plan["resolution"]).hr
    if dataset is None:
        raise ValueError(
            f"tadsr targets: the plan's images come from {plan['source']}, but no dataset is open"
        )
    rows = [dataset[j % len(dataset)]["pixel_values"] for j in range(start, end)]
    return torch.stack(rows).float()


@torch.no_grad()
def make_shard(plan: dict, k: int, teacher, dataset=None) -> dict[str, torch.Tensor]:
    """The tensors of shard k (a pure function of the plan and k)."""
    start, end = shard_range(plan, SPEC, k)
    g = torch.Generator().manual_seed(plan["seed"] * 1_000_003 + k)
    hr = high_res_images(plan, start, end, g, dataset)
    low_res = downscale(hr)
    n, latent = end - start, plan["latent_shape"]
    low_res_noise = torch.randn(low_res.shape, generator=g)
    noise = torch.randn((n, *latent), generator=g)
    denoiser = teacher.denoiser(adapter=None)
    targets, reals = [], []
    for i in range(0, n, plan["batch_size"]):
        sl = slice(i, i + plan["batch_size"])
        cond = teacher.image_cond(low_res[sl], plan["noise_level"], noise=low_res_noise[sl])
        x = noise[sl].to(teacher.device)
        targets.append(ode_sample(denoiser, x, cond, plan["steps"], teacher.alphas_cumprod).float().cpu())
        mean, _ = teacher.latent_posterior(hr[sl])
        reals.append((mean * teacher.vae.config.scaling_factor).float().cpu())
    dtype = DTYPES[plan["dtype"]]
    return {
        "noise": noise.to(dtype),
        "low_res": low_res.to(dtype),
        "low_res_noise": low_res_noise.to(dtype),
        "target": torch.cat(targets).to(dtype),
        "real": torch.cat(reals).to(dtype),
        "item_index": torch.arange(start, end),
    }


def prepare_targets(folder, plan: dict, teacher, dataset=None, rank=0, world_size=1, barrier=lambda: None):
    """Make what is missing of the target folder (ranks split the shards) and open it."""
    make = functools.partial(make_shard, plan, teacher=teacher, dataset=dataset)
    generate_all(folder, plan, SPEC, make, rank=rank, world_size=world_size, barrier=barrier)
    return TargetStore(folder, plan)


class TargetStore(ShardReader):
    """Read access to a complete target folder, item by item (lazy reads)."""

    def __init__(self, folder: str | Path, plan: dict | None = None):
        super().__init__(folder, SPEC, plan)

    def __str__(self) -> str:
        return f"{self.folder}: {self.num_items} TAD-SR items"

    def items(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Every per-item tensor (float32) of the given items, stacked."""
        return self.rows(indices, [key for key in KEYS if key != "item_index"])
