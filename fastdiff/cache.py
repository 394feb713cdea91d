"""``fastdiff cache``: the text embeddings of every training prompt and, for image datasets, the VAE posterior of every
image, computed once into resumable safetensors shards; a run with ``cache=DIR`` reads its batches from them.

Folder layout (the resumable shards of ``fastdiff.methods.shards``, split across ranks)::

    manifest.json             {"fingerprint", "complete", "plan", "shards"}; the plan says what was cached: the
                              teacher (path, family, prediction type, ``encoders``: a fingerprint of its text
                              encoders' and VAE's weights, ``dtype``), ``resolution``, the data (``data`` file or
                              dataset, its columns, ``num_items``, ``texts_sha256`` of every item's text), each
                              tensor's per-item shape and dtype, ``shard_size``
    shard-00000.safetensors   items [0, shard_size): ``item_index``; ``prompt_embeds`` (SDXL: and ``pooled``,
                              ``time_ids``) in the dtype the teacher encodes in; for datasets ``latent_mean`` and
                              ``latent_std``, the VAE posterior, in the VAE's dtype (lossless: it is computed in it)

Bit-identical batches: batched kernels round differently with the batch size (the tiny CPU teachers do), so every
prompt and every image is encoded alone, a batch of one, here and in training from raw data (``encode_each``, and
``run.make_batch_fn``'s per-image posterior); a batch's ``cond`` is then the same bits whichever way it was made,
and its ``real`` latents are drawn from the same posterior with the step's generator by ``Teacher.sample_latents``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .config import ConfigError
from .methods.shards import (
    DTYPES,
    MANIFEST,
    ShardError,
    ShardReader,
    ShardSpec,
    generate_all,
    num_shards,
    read_manifest,
    shard_range,
    teacher_fields,
)
from .models.denoiser import Cond

logger = logging.getLogger("fastdiff")
COND_KEYS = ("prompt_embeds", "pooled", "time_ids")  # the Cond fields a text encoding fills
LATENT_KEYS = ("latent_mean", "latent_std")
LAYOUT = ("shard_size", "num_shards")  # plan entries that do not change what an item holds


class CacheError(ShardError, ConfigError):
    """A cache folder that does not fit the run, or data that cannot be cached exactly."""


def encode_each(teacher, texts: list[str], resolution: int) -> Cond:
    """``teacher.encode(texts, resolution)``, each prompt it has not seen encoded alone first (a batch of one), so
    that a prompt's embedding is the same bits whichever batch it comes in, and those ``fastdiff cache`` stores."""
    for text in dict.fromkeys(texts):
        teacher.encode([text], resolution)
    return teacher.encode(texts, resolution)


def item_texts(prompts: list[str] | None, dataset) -> list[str]:
    """The text of every training item: the dataset's captions when there is a dataset, else the prompts."""
    if dataset is None:
        if prompts is None:
            raise CacheError("nothing to cache: set `prompts=<file>` or `dataset=<images>`")
        return list(prompts)
    if not hasattr(dataset, "captions"):
        raise CacheError(f"a {type(dataset).__name__} dataset cannot be cached: it has no indexed captions")
    return dataset.captions()


def _data_fields(cfg, texts: list[str], with_latents: bool) -> dict:
    source = cfg.dataset if with_latents else cfg.prompts
    if source and not str(source).startswith("builtin:"):
        source = str(Path(source).resolve())
    return {
        "data": source,
        "image_column": cfg.image_column if with_latents else None,
        "caption_column": cfg.caption_column if with_latents else None,
        "num_items": len(texts),
        "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
    }


def _encoders_fingerprint(teacher) -> str:
    from .models.lora import unet_fingerprint

    parts = [
        f"{name}:{unet_fingerprint(module)}"
        for name, module in sorted(teacher.pipeline.components.items())
        if (name.startswith("text_encoder") or name == "vae") and isinstance(module, torch.nn.Module)
    ]
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def cache_plan(teacher, resolution: int, cfg, texts: list[str], with_latents: bool) -> dict:
    """What a cache of this run holds, without its layout (``shard_size``): the teacher, the resolution, the data,
    and each tensor's per-item shape and dtype (from the null prompt's encoding and the VAE's latent shape)."""
    probe = teacher.encode([""], resolution)
    shapes = {k: list(getattr(probe, k).shape[1:]) for k in COND_KEYS if getattr(probe, k) is not None}
    dtypes = {k: str(getattr(probe, k).dtype).removeprefix("torch.") for k in shapes}
    if with_latents:
        side = resolution // teacher.vae_scale
        for key in LATENT_KEYS:
            shapes[key] = [teacher.vae.config.latent_channels, side, side]
            dtypes[key] = str(teacher.vae.dtype).removeprefix("torch.")
    plan = {
        "kind": "fastdiff-cache",
        **teacher_fields(teacher, resolution),
        "encoders": _encoders_fingerprint(teacher),
        "dtype": str(teacher.dtype).removeprefix("torch."),
        **_data_fields(cfg, texts, with_latents),
        "shapes": shapes,
        "dtypes": dtypes,
    }
    return json.loads(json.dumps(plan))  # as the manifest reads back (lists, not tuples)


def cache_spec(plan: dict, folder: str | Path) -> ShardSpec:
    return ShardSpec(
        kind="fastdiff-cache",
        what="items",
        keys=("item_index", *plan["shapes"]),
        index_key="item_index",
        count_key="num_items",
        shapes=lambda plan, n: {key: (n, *shape) for key, shape in plan["shapes"].items()},
        folder_key="--out",
        command=f"fastdiff cache --config <recipe> --out {folder}",
        error=CacheError,
    )


def _lossless(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    if not torch.equal(y.to(x.dtype), x):
        raise CacheError(f"a VAE posterior is not representable in {dtype}: cache with mixed_precision=no")
    return y


def write_cache(folder: str | Path, ctx, shard_size: int = 256, max_shards: int | None = None) -> dict:
    """Make every missing or broken shard of the cache of a run (``ctx``: its ``RunContext``) in ``folder``:
    resumable (shards already made are kept), split across ``ctx.rank`` / ``ctx.world_size``.

    Each item's text is encoded alone; each dataset image (decoded by the dataset, as in training) gets its VAE
    posterior, computed alone. A dataset with random augmentation (random crops, flips, a caption chosen at random
    among several) or an unreadable image is refused: a cache holds one fixed image and text per item.

    Args:
        folder: the cache folder (created).
        ctx: the run's context (teacher, resolution, prompts / dataset, the run config, ranks).
        shard_size: items per shard.
        max_shards: stop after making this many shards on this rank (tests of interrupted runs).

    Returns:
        ``generate``'s report: {"generated", "skipped", "complete"}.
    """
    teacher, resolution, dataset = ctx.teacher, ctx.resolution, ctx.dataset
    texts = item_texts(ctx.prompts, dataset)
    with_latents = dataset is not None
    if with_latents and (getattr(dataset, "random_flip", False) or not getattr(dataset, "center_crop", True)):
        raise CacheError("the dataset crops or flips at random: a cache holds one fixed image per item")
    plan = cache_plan(teacher, resolution, ctx.run, texts, with_latents)
    if shard_size < 1:
        raise CacheError(f"the shard size must be at least 1, got {shard_size}")
    plan.update(shard_size=shard_size, num_shards=num_shards(len(texts), shard_size))
    spec = cache_spec(plan, folder)
    dtypes = {key: DTYPES[name] for key, name in plan["dtypes"].items()}

    def item(i: int) -> dict[str, torch.Tensor]:
        # Teacher._encode is Teacher.encode without its per-prompt cache, which would keep every prompt on the device
        cond = teacher._encode([texts[i]], resolution)[0]
        out = {k: getattr(cond, k)[None].cpu() for k in COND_KEYS if k in dtypes}
        if with_latents:
            skipped = len(dataset.skipped)
            pixels = dataset[i]
            if len(dataset.skipped) > skipped:
                raise CacheError(f"dataset item {i} ({dataset.skipped[-1]}) is unreadable: fix or remove it")
            if pixels["prompt"] != texts[i]:
                raise CacheError(
                    f"dataset item {i} has several captions, one chosen at random: it cannot be cached"
                )
            posterior = teacher.latent_posterior(pixels["pixel_values"][None])
            out.update({k: _lossless(v.cpu(), dtypes[k]) for k, v in zip(LATENT_KEYS, posterior)})
        return out

    def make(k: int) -> dict[str, torch.Tensor]:
        start, end = shard_range(plan, spec, k)
        items = [item(i) for i in range(start, end)]
        return {
            "item_index": torch.arange(start, end),
            **{key: torch.cat([x[key] for x in items]) for key in dtypes},
        }

    return generate_all(
        folder,
        plan,
        spec,
        make,
        rank=ctx.rank,
        world_size=ctx.world_size,
        barrier=ctx.barrier,
        max_shards=max_shards,
    )


class CachedData:
    """A complete cache folder, checked against the run, read lazily: each batch's ``cond`` and VAE posterior.

    A folder made for another teacher, resolution, precision or data is a one-line ``CacheError`` naming ``cache=``
    and what differs.

    Args:
        folder: the ``cache=`` folder.
        teacher / resolution / cfg: the run's teacher, resolution and config.
        prompts / dataset: the run's training prompts and dataset (as ``run_context`` opens them).
    """

    def __init__(self, folder: str | Path, teacher, resolution: int, cfg, prompts, dataset):
        self.folder, self.teacher = Path(folder), teacher
        self.texts = item_texts(prompts, dataset)
        self.with_latents = dataset is not None
        expected = cache_plan(teacher, resolution, cfg, self.texts, self.with_latents)
        manifest = read_manifest(self.folder, cache_spec(expected, folder))
        if manifest is None:
            raise CacheError(
                f"cache={folder} has no {MANIFEST}: make it with `{cache_spec(expected, folder).command}`"
            )
        plan = manifest.get("plan", {})
        differs = sorted(
            k for k in set(expected) | set(plan) if k not in LAYOUT and plan.get(k) != expected.get(k)
        )
        if differs:
            raise CacheError(
                f"cache={folder} was made for another run (differs in: {', '.join(differs)}): make it again with "
                f"`fastdiff cache --config <recipe> --out {folder}` or unset cache="
            )
        try:
            self.reader = ShardReader(self.folder, cache_spec(plan, folder))
        except ShardError as e:
            raise CacheError(f"cache={folder}: {e}") from None
        self.dtypes = {key: DTYPES[name] for key, name in plan["dtypes"].items()}

    def _rows(self, indices: list[int], keys) -> dict[str, torch.Tensor]:
        rows = self.reader.rows(indices, keys)  # float32: lossless for the stored half precisions
        return {key: v.to(self.teacher.device, self.dtypes[key]) for key, v in rows.items()}

    def cond(self, indices: list[int]) -> Cond:
        """The items' text conditioning, as ``encode_each`` gives it, on the teacher's device."""
        return Cond(**self._rows(indices, [k for k in COND_KEYS if k in self.dtypes]))

    def posterior(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The items' VAE posterior (mean, std), float32 on the teacher's device, as ``Teacher.latent_posterior``."""
        rows = self._rows(indices, LATENT_KEYS)
        return tuple(rows[k].float() for k in LATENT_KEYS)


def run_on_cpu(module: torch.nn.Module, device: torch.device) -> None:
    """Keep ``module`` on the CPU: forward hooks move its inputs there and its outputs to ``device``."""
    from accelerate.utils import send_to_device

    cpu = torch.device("cpu")
    module.to(cpu)
    module.register_forward_pre_hook(
        lambda _, args, kwargs: send_to_device((args, kwargs), cpu), with_kwargs=True
    )
    module.register_forward_hook(lambda _, args, output: send_to_device(output, device))


def offload_text_encoders(teacher, prompts: list[str], resolutions) -> list[str]:
    """Move the teacher's text encoders to the CPU, once a run's batches come from a cache.

    Saves on the accelerator their weights (SDXL: CLIP ViT-L and OpenCLIP ViT-bigG, about 0.8 B parameters, 1.6 GB
    in half precision; SD1.5: about 0.12 B, 0.25 GB), and the embedding of every training prompt, which
    ``Teacher.encode`` would keep there (SDXL: 77 x 2048 values, 315 kB in half precision, each). ``prompts`` (the
    null prompt, the validation prompts) are encoded first on the device, each alone, at each of ``resolutions``; a
    prompt encoded later runs on the CPU and its embedding comes back to the teacher's device (``run_on_cpu``). The
    VAE stays where it is: validation decodes with it and some losses (DMD2's LPIPS regression) use it.

    Returns:
        The names of the components moved.
    """
    for resolution in dict.fromkeys(resolutions):
        encode_each(teacher, prompts, resolution)
    moved = []
    for name, module in teacher.pipeline.components.items():
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
            run_on_cpu(module, teacher.device)
            moved.append(name)
    logger.info("cache: %s moved to the CPU", ", ".join(moved))
    return moved
