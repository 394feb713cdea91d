"""config -> teacher + method -> trainer -> export: the code behind ``train/distill.py`` and ``fastdiff train``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from .config import ConfigError, TrainConfig, describe, load_config, resolve_mixed_precision, to_dict
from .data import DataError
from .logs import quiet_libraries, setup_logging

logger = logging.getLogger("fastdiff")
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_batch_fn(
    cfg: TrainConfig, teacher, resolution: int, prompts, dataset, rank: int, world_size: int, indices=None
):
    """``batch_fn(step, micro, generator)``: the batch of one micro-step, a pure function of its arguments.
    ``indices(step, micro)`` chooses its items (a method's ``batch_indices``); default: shuffled epochs, where
    micro-step ``micro`` of rank ``rank`` is the global batch's slice ``rank * accum + micro`` of ``world_size *
    accum`` (so two ranks and one rank with two accumulation steps train on the same batches). Dataset images are
    decoded by a ``data.StepItemLoader`` (in ``cfg.dataloader_num_workers`` worker processes, ahead of the step),
    each with a torch seed of its (seed, step, slice, position): the same batch with any number of workers, and on
    resume. Each new prompt and each image is encoded alone (``cache.encode_each``, a per-image posterior), so that
    its encoding is the same bits in any batch; with ``cfg.cache`` the batches read those encodings from the cache
    folder instead (``cache.CachedData``: no image is decoded, the same bits) and the text encoders move to the CPU
    (``cache.offload_text_encoders``)."""
    from .cache import CachedData, encode_each, offload_text_encoders
    from .data import StepItemLoader, item_seed, sample_indices

    n_items = len(dataset) if dataset is not None else len(prompts)
    accum = cfg.gradient_accumulation_steps
    posteriors: dict[int, tuple] = {}  # cache_latents: dataset index -> VAE posterior (mean, std)
    cached = CachedData(cfg.cache, teacher, resolution, cfg, prompts, dataset) if cfg.cache else None
    if cached is not None:  # the null prompt and validation prompts are encoded on the device before the move
        offload_text_encoders(teacher, ["", *cfg.validation_prompts], [resolution, teacher.resolution])

    def choose(key: int) -> list[int]:  # key: the micro-step, step * accum + micro
        step, micro = divmod(key, accum)
        if indices is not None:
            return list(indices(step, micro))
        part, parts = rank * accum + micro, world_size * accum
        return sample_indices(n_items, cfg.train_batch_size, step, cfg.seed, part, parts)

    def plan(key: int) -> tuple[list[int], list[int]]:
        idx, (step, micro) = choose(key), divmod(key, accum)
        return idx, [item_seed(cfg.seed, step, pos, rank * accum + micro) for pos in range(len(idx))]

    with_loader = dataset is not None and cached is None
    loader = StepItemLoader(dataset, plan, cfg.dataloader_num_workers) if with_loader else None

    def posterior(i: int, item: dict) -> tuple[torch.Tensor, torch.Tensor]:  # of one image, encoded alone
        if i in posteriors:
            return posteriors[i]
        mean_std = teacher.latent_posterior(item["pixel_values"][None])
        if cfg.cache_latents:
            posteriors[i] = mean_std
        return mean_std

    def batch_fn(step: int, micro: int, generator: torch.Generator) -> dict:
        real = None
        if cached is not None:
            idx = choose(step * accum + micro)
            texts = [cached.texts[i] for i in idx]
            if cached.with_latents:
                real = teacher.sample_latents(*cached.posterior(idx), generator=generator)
        elif loader is not None:
            idx, items = loader(step * accum + micro)
            texts = [it["prompt"] for it in items]
            mean, std = (torch.cat(t) for t in zip(*(posterior(i, it) for i, it in zip(idx, items))))
            real = teacher.sample_latents(mean, std, generator=generator)
        else:
            idx = choose(step * accum + micro)
            texts = [prompts[i] for i in idx]
        cond = cached.cond(idx) if cached is not None else encode_each(teacher, texts, resolution)
        return {"cond": cond, "real": real, "prompts": texts, "indices": idx}

    return batch_fn


def make_validate_fn(cfg: TrainConfig, method, teacher, resolution, latent_shape, accelerator):
    from .cache import encode_each
    from .export import image_grid
    from .models.denoiser import cat_conds

    prompts = [p for p in cfg.validation_prompts for _ in range(cfg.num_validation_images)]
    samples = Path(cfg.output_dir) / "samples"

    @torch.no_grad()
    def validate(step: int) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        if teacher.image_conditioned:  # held-out low-resolution images, conditioned as the export's call does
            call = method.recipe(dict(teacher.pipeline.scheduler.config)).for_steps().call_kwargs()
            inputs = teacher.example_inputs(prompts, resolution)
            cond = cat_conds([teacher.call_cond(x, call, gen) for x in inputs])
        else:  # each prompt alone, as training encodes it (with cache=: encoded before the text encoders moved)
            cond = encode_each(teacher, prompts, resolution)
        noise = torch.randn((len(prompts), *latent_shape), generator=gen).to(accelerator.device)
        x0 = method.generate(noise, cond, generator=gen)
        images = teacher.decode(x0)
        if accelerator.is_main_process:  # every rank samples when the networks are sharded; one writes
            samples.mkdir(parents=True, exist_ok=True)
            image_grid(images, rows=len(cfg.validation_prompts)).save(samples / f"step-{step:06d}.png")
            log_validation_images(accelerator, images, step)

    return validate


def log_validation_images(accelerator, images: torch.Tensor, step: int) -> None:
    """[N, 3, H, W] images in [0, 1] to the active trackers that take images: tensorboard and wandb."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.cpu().numpy(), step, dataformats="NCHW")
        elif tracker.name == "wandb":  # accelerate's tracker wraps each array in a wandb.Image
            arrays = (images.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
            tracker.log_images({"validation": list(arrays)}, step=step)


ATTENTION = ("sdpa", "xformers")


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse an ``attention`` setting the run cannot use: xformers needs a CUDA device and the package."""
    if attention not in ATTENTION:
        raise ConfigError(f"attention={attention} is not one of {', '.join(ATTENTION)}")
    if attention != "xformers":
        return
    if torch.device(device).type != "cuda":
        raise ConfigError(
            f"attention=xformers needs a CUDA GPU (xformers is GPU-only) and this run is on {device}; "
            "use attention=sdpa"
        )
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError(
            "attention=xformers needs xformers, which is not installed: pip install 'fastdiff[xformers]'"
        )


def use_attention(attention: str, modules) -> int:
    """With attention=xformers, switch every diffusers UNet among ``modules`` (and their submodules) to xformers'
    memory-efficient attention; sdpa (diffusers' default) changes nothing. Returns the number of UNets switched."""
    if attention != "xformers":
        return 0
    from diffusers import UNet2DConditionModel, UNet2DModel

    unets = {
        id(m): m
        for root in modules
        for m in root.modules()
        if isinstance(m, (UNet2DConditionModel, UNet2DModel))
    }
    for unet in unets.values():
        unet.enable_xformers_memory_efficient_attention()
    return len(unets)


def cpu_threads(setting: int | None, num_processes: int) -> int | None:
    """The torch thread count the ``cpu_threads`` config asks for (None: leave it as it is; note that
    ``accelerate launch`` without a config gives each process one thread)."""
    if setting is None:
        return None
    if setting < 0:
        raise ValueError(f"cpu_threads must be >= 0 (0: all cores), got {setting}")
    return setting or max(1, len(os.sched_getaffinity(0)) // num_processes)


def run_context(cfg: TrainConfig, teacher, accelerator=None, with_data: bool = True):
    """The ``RunContext`` of a run: teacher, the method's section, resolution and shapes, and (``with_data``) the
    training prompts / dataset and the ranks."""
    from .data import load_prompts, open_dataset
    from .methods.base import RunContext

    resolution = cfg.resolution or teacher.resolution
    ctx = RunContext(
        teacher, cfg.section, cfg, resolution, teacher.latent_shape(resolution), cfg.dataset is not None
    )
    if accelerator is not None:
        ctx.rank, ctx.world_size = accelerator.process_index, accelerator.num_processes
        ctx.barrier = accelerator.wait_for_everyone
    if with_data:
        ctx.dataset = ctx.prompts = None
        try:  # what the user's files hold: one line naming the key and the problem
            if cfg.dataset:
                ctx.dataset = open_dataset(cfg.dataset, resolution, cfg.image_column, cfg.caption_column)
            if cfg.prompts:
                ctx.prompts = load_prompts(cfg.prompts)
        except DataError:
            raise
        except (ValueError, OSError) as e:
            key = (
                f"dataset={cfg.dataset}" if ctx.dataset is None and cfg.dataset else f"prompts={cfg.prompts}"
            )
            raise DataError(f"{key}: {e}") from None
        from .methods import registry

        if ctx.dataset is None and ctx.prompts is None and not registry.get(cfg.method).own_data:
            raise ConfigError(
                "no training prompts: set `prompts=<file.txt|.jsonl>` or `dataset=<image folder>`"
            )
    return ctx


def train(cfg: TrainConfig) -> Path:
    """Run one distillation from its config; returns the output folder."""
    with quiet_libraries():
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .export import export
    from .methods import registry
    from .teacher import Teacher
    from .trainer import Trainer, make_accelerator

    out = Path(cfg.output_dir)
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)  # what checkpoints record: what runs
    AcceleratorState._reset_state()  # a second run in one process may use another precision (keeps the process group)
    accelerator = make_accelerator(cfg)
    check_attention(cfg.attention, accelerator.device)
    threads = cpu_threads(cfg.cpu_threads, accelerator.num_processes)
    if threads and accelerator.device.type == "cpu":
        torch.set_num_threads(threads)
    setup_logging(accelerator.is_main_process)
    set_seed(cfg.seed)  # the same on every rank: identical initial weights everywhere
    teacher = Teacher(cfg.teacher, device=accelerator.device, dtype=WEIGHT_DTYPES[cfg.mixed_precision])
    use_attention(cfg.attention, [teacher.unet])
    ctx = run_context(cfg, teacher, accelerator)
    method_cls = registry.get(cfg.method)
    ctx.prepared = method_cls.prepare(ctx)  # the method's stage before training, if it has one
    method = method_cls.build(ctx)
    use_attention(cfg.attention, [method])  # the UNets the method built (copies, students) as well
    own = method.batch_source(ctx)
    if own is not None and cfg.cache:
        raise ConfigError(
            f"cache={cfg.cache}: {cfg.method} brings its own batches (from its prepare stage), not the run's prompts "
            "or dataset; unset cache="
        )
    batch_fn = own or make_batch_fn(
        cfg,
        teacher,
        ctx.resolution,
        ctx.prompts,
        ctx.dataset,
        ctx.rank,
        ctx.world_size,
        method.batch_indices(ctx),
    )
    validate = make_validate_fn(cfg, method, teacher, ctx.resolution, ctx.latent_shape, accelerator)
    trainer = Trainer(method, cfg, batch_fn, validate, saved_config(cfg, teacher), accelerator)
    t0 = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    if ctx.dataset is not None and ctx.dataset.num_skipped:
        logger.warning(
            "%d unreadable images were skipped: %s", ctx.dataset.num_skipped, ctx.dataset.skipped[:10]
        )
    if cfg.export and accelerator.is_main_process:
        config = saved_config(cfg, teacher)  # the teacher as given and resolved
        if trainer.fsdp and accelerator.num_processes > 1:
            # the networks are sharded across ranks: export the full (EMA) weights of the final checkpoint, which
            # every rank gathered, into a fresh copy of the method
            from .trainer import find_checkpoint

            method, teacher, _ = load_checkpoint_method(find_checkpoint(out, "latest"))
        else:
            trainer.use_ema_weights()
        export(method, teacher, config, out, cfg.lora_scale, cfg.validation_prompts, train_seconds)
        logger.info("exported to %s", out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers (and, with several ranks, the process group)
    return out


def saved_config(cfg: TrainConfig, teacher) -> dict:
    """The plain config a run's checkpoints and export record: ``to_dict(cfg)``, whose ``teacher`` is the teacher as
    given, plus ``teacher_path``, the folder it was loaded from resolved to an absolute path (so that a checkpoint
    exports from any working directory; ``load_checkpoint_method`` takes it out again)."""
    return {**to_dict(cfg), "teacher_path": str(Path(teacher.path).resolve())}


def checkpoint_teacher(checkpoint: Path, given: str, resolved: str | None) -> str:
    """The teacher folder of a checkpoint: the absolute path recorded at training time, else the teacher as given
    (relative to the working directory, or one of fastdiff's bundled teachers). A TeacherError naming ``--teacher``
    when neither is a folder here."""
    from .recipe import teacher_folder
    from .teacher import TeacherError

    if resolved and Path(resolved).is_dir():
        return resolved
    try:
        return str(teacher_folder(given))
    except FileNotFoundError:
        where = f"{given!r}" + (f" ({resolved})" if resolved and resolved != given else "")
        raise TeacherError(
            f"{checkpoint}: its teacher {where} is not a folder here: pass the teacher folder with "
            "`fastdiff export --teacher <folder>`"
        ) from None


def load_checkpoint_method(checkpoint: str | Path, teacher: str | None = None, ema: bool = True):
    """Rebuild (method, teacher, cfg) from a checkpoint's saved config and load its weights (EMA where kept).

    The teacher is ``teacher`` when given (``cfg.teacher`` becomes it), else the one the checkpoint records
    (``checkpoint_teacher``); ``cfg.teacher`` stays as given, the Teacher is loaded from the resolved folder."""
    import json

    from safetensors.torch import load_file

    from .config import from_dict
    from .methods import build
    from .teacher import Teacher
    from .trainer import load_group_tensors

    checkpoint = Path(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a fastdiff checkpoint (no trainer_state.json)")
    from .trainer import verify_checkpoint

    problem = verify_checkpoint(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint} is damaged: {problem}")
    saved = json.loads(state_file.read_text())["config"]
    resolved = saved.pop("teacher_path", None)
    cfg = from_dict(saved)
    if teacher:
        cfg.teacher = teacher
    t = Teacher(teacher or checkpoint_teacher(checkpoint, cfg.teacher, resolved))
    method = build(run_context(cfg, t, with_data=False))
    groups = method.groups()
    load_group_tensors(groups, load_file(str(checkpoint / "trainable.safetensors")), checkpoint)
    if ema and (checkpoint / "ema.safetensors").is_file():
        tensors = load_file(str(checkpoint / "ema.safetensors"))
        load_group_tensors(
            [g for g in groups if any(k.startswith(f"{g.name}/") for k in tensors)], tensors, checkpoint
        )
    if (checkpoint / "method_state.safetensors").is_file():  # e.g. TSCD's finished stages' LoRAs
        method.load_extra_state(load_file(str(checkpoint / "method_state.safetensors")))
    method.eval()
    return method, t, cfg


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, teacher: str | None = None, hub_layout: bool = False
) -> Path:
    """Export a checkpoint (EMA weights where kept) as pipeline/ (or, ``hub_layout``, a loadable repo at the root)
    + lora/ + fastdiff.json + model card."""
    from .export import export

    method, t, cfg = load_checkpoint_method(checkpoint, teacher)
    return export(
        method,
        t,
        saved_config(cfg, t),
        out_dir,
        cfg.lora_scale,
        prompts=cfg.validation_prompts,
        hub_layout=hub_layout,
    )


def prepare(cfg: TrainConfig):
    """The method's stage before training on its own (``fastdiff prepare``; AGD: generate what is missing of the
    trajectory folder). Returns what the stage returned (None: the method has none)."""
    from .methods import registry
    from .teacher import Teacher

    setup_logging()
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_attention(cfg.attention, device)
    with quiet_libraries():
        teacher = Teacher(cfg.teacher, device=device, dtype=WEIGHT_DTYPES[cfg.mixed_precision])
        use_attention(cfg.attention, [teacher.unet])
        return registry.get(cfg.method).prepare(run_context(cfg, teacher))


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil a diffusion teacher into a few-step generator (accelerate launch ...).",
    )
    parser.add_argument("--config", help="recipe YAML (assets/configs/...)")
    from .cli import PRINT_CONFIG_HELP

    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. teacher=/models/sdxl max_steps=20"
    )
    return parser


def _fail(error: Exception) -> NoReturn:
    print(f"fastdiff: error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    """``train/distill.py`` and ``fastdiff train``: train, or (``--print-config``) print the config. An error while
    the config loads, and a config or teacher error while training, is one ``fastdiff: error: ...`` line on stderr
    and exit status 2."""
    from .teacher import TeacherError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = train_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, require_teacher=not args.print_config)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    if args.print_config:
        print(f"# {args.config or 'defaults'} + overrides; each key: its value  # its default; its meaning")
        print(describe(cfg))
        return
    try:
        train(cfg)
    except (ConfigError, TeacherError, DataError, FileNotFoundError) as e:
        _fail(e)
