"""The teacher's ODE pairs: noise z and the teacher's sample x0(z) after its multi-step sampler with CFG, stored in
resumable safetensors shards (``fastdiff.methods.shards``). DMD2's regression initialisation trains on them.

Folder layout::

    manifest.json             the plan (teacher, prompts, sampler steps, CFG w, seed, ...) and its fingerprint
    shard-00000.safetensors   pairs [0, shard_size): noise [n, C, H, W], image [n, C, H, W] (the teacher's x0),
                              prompt_index [n] (into the plan's prompts), pair_index [n]

The sampler is deterministic DDIM on trailing timesteps (``schedule.ddim_timesteps``), the first-order solver of
the probability-flow ODE, with CFG in x0 space (``CFG``: SDXL's unconditional branch is the zeroed prompt): a pure
function of (teacher, z, prompt). Pair j uses prompt perm[j mod P] (perm: a permutation of the P prompts seeded by
the run seed, so every prompt is used before any repeats); shard k's noise comes from a generator seeded by
(seed, k), so each shard is a pure function of (plan, k).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import schedule
from .base import randint
from .shards import (
    DTYPES,
    ShardError,
    ShardReader,
    ShardSpec,
    generate,
    generate_all,
    num_shards,
    shard_range,
    teacher_fields,
)

VERSION = 1
KEYS = ("noise", "image", "prompt_index", "pair_index")


class PairError(ShardError):
    """A pair folder that does not fit the run: another plan, a missing or unreadable shard."""


def _pair_shapes(plan: dict, n: int) -> dict[str, tuple[int, ...]]:
    return {"noise": (n, *plan["latent_shape"]), "image": (n, *plan["latent_shape"])}


SPEC = ShardSpec(
    "ode-pairs",  # kind
    "pairs",  # what
    KEYS,
    "pair_index",  # index_key
    "num_pairs",  # count_key
    _pair_shapes,
    "dmd2.pairs",  # folder_key
    "fastdiff prepare --config <recipe>",  # command
    PairError,
)


@torch.no_grad()
def ode_sample(denoiser: Callable, noise: torch.Tensor, cond, steps: int, alphas_cumprod: torch.Tensor):
    """Deterministic DDIM from pure noise on ``steps`` trailing timesteps; returns the final x0.

    Args:
        denoiser: an x0 predictor ``denoiser(x_t, t, cond)`` (e.g. ``CFG(teacher, w, null)``).
        noise: [n, ...] standard normal noise, read as x at t = T - 1.
        cond: the batch's condition.
        steps: sampler steps (the teacher's UNet calls, times two with CFG).
        alphas_cumprod: the schedule.
    """
    ts = schedule.ddim_timesteps(steps, len(alphas_cumprod))
    x = noise
    for i, t in enumerate(ts):
        t_vec = torch.full((len(x),), t, device=x.device)
        x0 = denoiser(x, t_vec, cond)
        eps = schedule.eps_from_x0(x0, x, t_vec, alphas_cumprod)
        x = schedule.ddim_step(x0, eps, ts[i + 1] if i + 1 < len(ts) else -1, alphas_cumprod)
    return x


def make_plan(
    teacher,
    prompts: list[str],
    num_pairs: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    seed: int,
    shard_size: int = 64,
    batch_size: int = 8,
    dtype: str = "float16",
) -> dict:
    """The JSON-able description of the pairs to generate; its fingerprint keys the folder.

    Args:
        teacher: the loaded Teacher (path, family, prediction type, latent shape).
        prompts: the prompts the pairs are drawn for.
        num_pairs: how many pairs.
        steps: the teacher's sampler steps per pair.
        guidance_scale: CFG w of the teacher's sampler.
        resolution: image side in pixels.
        seed: the run seed.
        shard_size / batch_size: pairs per shard / per sampler batch.
        dtype: float32 | float16 | bfloat16, the stored noise and images.
    """
    if not prompts:
        raise ValueError("teacher ODE pairs need at least one prompt")
    for name, value in (("num_pairs", num_pairs), ("steps", steps), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"teacher ODE pairs: {name} must be >= 1, got {value}")
    if batch_size < 1:
        raise ValueError(f"teacher ODE pairs: batch_size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"teacher ODE pairs: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return {
        "version": VERSION,
        **teacher_fields(teacher, resolution),
        "prompts": list(prompts),
        "num_pairs": num_pairs,
        "shard_size": shard_size,
        "num_shards": num_shards(num_pairs, shard_size),
        "sampler": "ddim-trailing",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "dtype": dtype,
        "batch_size": batch_size,
    }


def prompt_indices(plan: dict, start: int, end: int) -> torch.Tensor:
    """The prompt of each pair in [start, end): perm[j mod P], perm a permutation of the prompts seeded by the seed."""
    perm = torch.randperm(len(plan["prompts"]), generator=torch.Generator().manual_seed(plan["seed"]))
    return perm[torch.arange(start, end) % len(perm)]


@torch.no_grad()
def make_shard(plan: dict, k: int, teacher) -> dict[str, torch.Tensor]:
    """The tensors of shard k: the teacher's CFG samples from its noise (a pure function of plan and k)."""
    from ..models.denoiser import CFG

    start, end = shard_range(plan, SPEC, k)
    g = torch.Generator().manual_seed(plan["seed"] * 1_000_003 + k)
    noise = torch.randn((end - start, *plan["latent_shape"]), generator=g)
    prompt_index = prompt_indices(plan, start, end)
    res, dtype = plan["resolution"], DTYPES[plan["dtype"]]
    real = CFG(
        teacher.denoiser(adapter=None), plan["guidance_scale"], teacher.unconditional(plan["latent_shape"])
    )
    images = []
    for i in range(0, end - start, plan["batch_size"]):
        sl = slice(i, i + plan["batch_size"])
        cond = teacher.encode([plan["prompts"][j] for j in prompt_index[sl].tolist()], res)
        x0 = ode_sample(real, noise[sl].to(teacher.device), cond, plan["steps"], teacher.alphas_cumprod)
        images.append(x0.float().cpu())
    return {
        "noise": noise.to(dtype),
        "image": torch.cat(images).to(dtype),
        "prompt_index": prompt_index,
        "pair_index": torch.arange(start, end),
    }


def generate_pairs(folder: str | Path, plan: dict, teacher, **kw) -> dict:
    """Make what is missing of the pair folder (keywords and report: ``fastdiff.methods.shards.generate``)."""
    return generate(folder, plan, SPEC, functools.partial(make_shard, plan, teacher=teacher), **kw)


def prepare_pairs(folder: str | Path, plan: dict, teacher, rank=0, world_size=1, barrier=lambda: None):
    """A run's pair stage: make what is missing (ranks split the shards), log it, and open the folder."""
    make = functools.partial(make_shard, plan, teacher=teacher)
    generate_all(folder, plan, SPEC, make, rank=rank, world_size=world_size, barrier=barrier)
    return PairStore(folder, plan)


class PairStore(ShardReader):
    """Read access to a complete pair folder, pair by pair (lazy reads)."""

    def __init__(self, folder: str | Path, plan: dict | None = None):
        super().__init__(folder, SPEC, plan)

    def __str__(self) -> str:
        return f"{self.folder}: {self.num_items} teacher ODE pairs"

    @property
    def prompts(self) -> list[str]:
        return self.plan["prompts"]

    def pairs(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """noise, image (float32) and prompt_index of the given pairs."""
        rec = self.rows(indices, ("noise", "image"))
        small = [self.shard(k)[1]["prompt_index"][i] for k, i in map(self.locate, indices)]
        return {**rec, "prompt_index": torch.stack(small)}


def pair_sampler(store: PairStore, encode: Callable[[list[str]], object]):
    """``draw(n, generator, device) -> {"noise", "image", "cond"}``: n pairs drawn uniformly (with replacement)
    from ``generator``, so a batch is a pure function of the generator's seed; ``encode`` turns prompts into the
    condition (e.g. the teacher's text encoders)."""

    def draw(n: int, generator: torch.Generator, device) -> dict:
        rec = store.pairs(randint(0, store.num_items, n, generator, "cpu").tolist())
        texts = [store.prompts[i] for i in rec["prompt_index"].tolist()]
        return {"noise": rec["noise"].to(device), "image": rec["image"].to(device), "cond": encode(texts)}

    return draw


# --- the regression loss ---------------------------------------------------------------------------------------
class LatentLPIPS(torch.nn.Module):
    """LPIPS between the images two latents decode to: ``lpips(decode(x), decode(y))`` per sample.

    Args:
        lpips: a module taking two image batches in [-1, 1] and returning one distance per sample (any shape that
            flattens to [n] or [n, 1, ...]); e.g. a TorchScript export of the ``lpips`` package's ``LPIPS(net=...)``.
        vae: the teacher's VAE (frozen; the generator's images are decoded with gradient).
    """

    def __init__(self, lpips: torch.nn.Module, vae: torch.nn.Module):
        super().__init__()
        self.lpips, self.vae = lpips, vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_images = self.decode(target)
        dist = self.lpips(self.decode(x), target_images)
        return dist.reshape(len(x), -1).mean(1)


def regression_loss(x: torch.Tensor, target: torch.Tensor, lpips: LatentLPIPS | None = None) -> torch.Tensor:
    """MSE in latent space, or (``lpips`` given) the mean LPIPS of the decoded images."""
    if lpips is None:
        return F.mse_loss(x.float(), target.float())
    return lpips(x, target).mean()


def load_lpips(path: str | Path) -> torch.nn.Module:
    """A local LPIPS model: a TorchScript file, or a folder holding ``lpips.pt`` (never downloaded)."""
    p = Path(path)
    if p.is_dir():
        p = p / "lpips.pt"
    if not p.is_file():
        raise FileNotFoundError(
            f"LPIPS model {path} not found: give a TorchScript file (or a folder with lpips.pt) that maps two image "
            "batches in [-1, 1] to per-sample distances, e.g. torch.jit.trace of the lpips package's LPIPS(net='vgg') "
            "saved on a machine that can download its weights; or leave it unset for the latent MSE"
        )
    module = torch.jit.load(str(p), map_location="cpu")
    module.eval()
    return module
