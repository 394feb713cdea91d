"""``fastdiff bench scale``: DMD2 training on full-size SDXL (1024²) and SD1.5 (512²) UNets, for memory and speed.

Each UNet is built from its config in random init (shapes in DESIGN.md §7; no download, no text encoders, VAE or
pipeline folder) and trained for a few DMD2 iterations through the real ``Trainer`` with bf16, gradient
checkpointing and AdamW or 8-bit AdamW, in three modes:

- ``shared-base``: generator and fake score as two LoRA adapters on the one frozen teacher UNet;
- ``full-copy``: generator and fake score as full float32 copies beside the frozen teacher;
- ``fsdp``: full-copy with ``parallel=fsdp``: every UNet sharded per block by the trainer (``fastdiff.parallel``);
  needs several processes (``accelerate launch --num_processes N``), else the row is recorded as skipped.

Each row records seconds per iteration, images per second, peak GPU memory and whether it fit; ``--tiny`` runs the
same code on the tiny UNets of ``fastdiff.models.tiny`` on the CPU (a test of the bench, not a measurement).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from ..models.denoiser import Cond, UNetDenoiser

logger = logging.getLogger("fastdiff")

MODES = ("shared-base", "full-copy", "fsdp")
FAMILIES = ("sdxl", "sd15")
OPTIMIZERS = ("adamw", "adamw8bit")
EIGHT_BIT_MODES = ("full-copy", "fsdp")  # where the optimizer state is what matters
RESOLUTION = {"sdxl": 1024, "sd15": 512}
TINY_SAMPLE_SIZE = 8  # tiny UNets: 8x8 latents, i.e. 64x64 "pixels"
STUDENT_TIMESTEPS = {"sdxl": [399], "sd15": [999]}  # 1-step students as DMD2 trains them
GUIDANCE_SCALE = {"sdxl": 8.0, "sd15": 1.75}
LORA_RANK, LORA_ALPHA = 64, 8  # DMD2's SDXL LoRA
TINY_LORA_RANK = 4  # the tiny UNets are 32-64 channels wide: rank 64 would out-size them
FSDP_SKIP = "needs >= 2 processes (accelerate launch --num_processes N)"
FIELDS = (
    "family",
    "resolution",
    "mode",
    "batch",
    "optimizer",
    "lora_rank",
    "unet_params",
    "trainable_params",
    "frozen_params",
    "s_per_it",
    "images_per_s",
    "peak_gib",
    "fit",
    "nonfinite_updates",
    "world_size",
    "skipped",
    "error",
)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=768,
)
UNET_CONFIGS = {"sdxl": SDXL_UNET, "sd15": SD15_UNET}
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


# --- the model: a UNet from its config, a stand-in teacher, random conditioning ------------------------------
def build_unet(family: str, tiny: bool, device, dtype: torch.dtype, seed: int = 0):
    """A random-init UNet2DConditionModel of the family, built directly on ``device`` (frozen, in ``dtype``)."""
    from diffusers import UNet2DConditionModel

    if family not in UNET_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    if tiny:
        from ..models.tiny import tiny_unet

        unet = tiny_unet(family, sample_size=TINY_SAMPLE_SIZE, seed=seed)
    else:
        with torch.device(device):
            unet = UNet2DConditionModel(**UNET_CONFIGS[family])
    unet.to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    return unet.requires_grad_(False).eval()


def cond_dims(unet) -> tuple[int, int | None]:
    """(prompt embedding width, pooled width or None) that ``unet`` reads, from its config."""
    c = unet.config
    if c.addition_embed_type != "text_time":
        return c.cross_attention_dim, None
    return c.cross_attention_dim, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim


def time_ids(resolution: int, n: int, device) -> torch.Tensor:
    """SDXL's micro-conditioning for a square image: (original size, crop top-left, target size)."""
    row = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return row.repeat(n, 1).to(device)


def random_cond(unet, n: int, resolution: int, generator: torch.Generator, device) -> Cond:
    """Random text conditioning of a batch: prompt embeddings [n, 77, D] and, for SDXL, pooled embeddings and the
    time ids."""
    width, pooled = cond_dims(unet)
    embeds = torch.randn((n, 77, width), generator=generator).to(device)
    if pooled is None:
        return Cond(embeds)
    return Cond(
        embeds, torch.randn((n, pooled), generator=generator).to(device), time_ids(resolution, n, device)
    )


class BenchTeacher:
    """What ``DMD2.build`` reads from a teacher, around a bare UNet: the scaled_linear schedule (1000 steps,
    betas 0.00085-0.012, epsilon prediction) and SDXL-style zeroed unconditional inputs."""

    def __init__(self, unet, family: str, resolution: int, device):
        from ..models.gmm import scaled_linear_alphas_cumprod

        self.unet, self.family, self.resolution = unet, family, resolution
        self.device = torch.device(device)
        self.dtype = unet.dtype
        self.alphas_cumprod = scaled_linear_alphas_cumprod(1000, 0.00085, 0.012)
        self.prediction_type = "epsilon"

    def denoiser(self, unet=None, adapter: str | None = "*") -> UNetDenoiser:
        return UNetDenoiser(
            unet if unet is not None else self.unet, self.alphas_cumprod, self.prediction_type, adapter
        )

    def unconditional(self, latent_shape):
        return functools.partial(self.null_cond, resolution=latent_shape[-1] * 8)

    def null_cond(self, n: int, resolution: int | None = None) -> Cond:
        width, pooled = cond_dims(self.unet)
        embeds = torch.zeros((n, 77, width), device=self.device)
        if pooled is None:
            return Cond(embeds)
        return Cond(
            embeds,
            torch.zeros((n, pooled), device=self.device),
            time_ids(resolution or self.resolution, n, self.device),
        )


# --- one row ---------------------------------------------------------------------------------------------------
def dmd2_config(family: str, mode: str, optimizer: str, lora_rank: int = LORA_RANK):
    from ..config import OptimizerConfig
    from ..methods.dmd2 import DMD2Config

    shared = mode == "shared-base"
    return DMD2Config(
        guidance_scale=GUIDANCE_SCALE[family],
        generator="lora" if shared else "full",
        fake_score="lora" if shared else "full",
        shared_base=shared,
        lora_rank=lora_rank,
        lora_alpha=LORA_ALPHA,
        student_timesteps=list(STUDENT_TIMESTEPS[family]),
        dfake_gen_update_ratio=1,  # both groups every iteration
        gan="off",
        optim=OptimizerConfig(optimizer=optimizer, weight_decay=0.01, warmup_steps=0, max_grad_norm=10.0),
    )


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def skip_reason(mode: str, optimizer: str, device: torch.device) -> str | None:
    """Why a row cannot run here, or None."""
    if mode == "fsdp" and _world()[1] < 2:
        return FSDP_SKIP
    if optimizer == "adamw8bit":
        if device.type != "cuda":
            return "adamw8bit (bitsandbytes) needs a CUDA GPU"
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # not installed, or built for another CUDA
            return f"bitsandbytes does not import ({type(e).__name__}: {e}); pip install 'fastdiff[gpu]'"
    return None


def _unique(params) -> dict[int, torch.nn.Parameter]:
    return {id(p): p for p in params}


def _measure(family, mode, batch, optimizer, tiny, iters, warmup, device, row) -> None:
    """Build, train ``warmup`` + ``iters`` iterations and fill ``row`` (may raise torch.cuda.OutOfMemoryError)."""
    from accelerate.state import AcceleratorState

    from ..config import TrainConfig
    from ..methods.base import RunContext
    from ..methods.dmd2 import DMD2
    from ..trainer import Trainer, make_accelerator

    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "no"
    resolution = row["resolution"]
    unet = build_unet(family, tiny, device, WEIGHT_DTYPES[precision])
    row["unet_params"] = sum(p.numel() for p in unet.parameters())
    teacher = BenchTeacher(unet, family, resolution, device)
    section = dmd2_config(family, mode, optimizer, TINY_LORA_RANK if tiny else LORA_RANK)
    with tempfile.TemporaryDirectory(prefix="fastdiff-scale-") as tmp:
        cfg = TrainConfig(
            output_dir=tmp,
            mixed_precision=precision,
            gradient_checkpointing=True,
            max_steps=warmup + iters,
            train_batch_size=batch,
            checkpointing_steps=10**9,
            report_to="none",
            parallel="fsdp"
            if mode == "fsdp"
            else "ddp",  # the trainer shards the full copies (fastdiff.parallel)
        )
        cfg.section = section
        rank, world = _world()
        latent = unet.config.sample_size if tiny else resolution // 8
        method = DMD2.build(
            RunContext(
                teacher=teacher,
                config=section,
                run=cfg,
                resolution=resolution,
                latent_shape=(4, latent, latent),
                with_real_data=False,
                rank=rank,
                world_size=world,
            )
        )
        cond = random_cond(unet, batch, resolution, torch.Generator().manual_seed(1), device)

        def batch_fn(step, micro, generator):
            return {"cond": cond, "real": None, "prompts": [""] * batch}

        AcceleratorState._reset_state()  # each row may change precision (keeps the process group)
        accelerator = make_accelerator(cfg)
        trainer = Trainer(method, cfg, batch_fn, accelerator=accelerator)
        trainable = _unique(p for g in trainer.groups for p in g.params.values())
        row["trainable_params"] = sum(p.numel() for p in trainable.values())
        row["frozen_params"] = sum(
            p.numel() for i, p in _unique(method.parameters()).items() if i not in trainable
        )
        try:
            for _ in range(warmup):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - t0) / iters
            row.update(
                s_per_it=seconds,
                images_per_s=batch / seconds,
                fit=True,
                nonfinite_updates=trainer.nonfinite_total,
            )
        finally:
            accelerator.free_memory()  # drops accelerate's references to the optimizers


def _row(family, mode, batch, optimizer, tiny) -> dict:
    row = dict.fromkeys(FIELDS)
    resolution = TINY_SAMPLE_SIZE * 8 if tiny else RESOLUTION[family]
    row.update(family=family, resolution=resolution, mode=mode, batch=batch, optimizer=optimizer)
    row["world_size"] = _world()[1]
    if mode == "shared-base":
        row["lora_rank"] = TINY_LORA_RANK if tiny else LORA_RANK
    return row


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_row(family, mode, batch, optimizer, tiny, iters, warmup, device) -> dict:
    """One configuration; out-of-memory is a result (``fit`` False), any other error is recorded in ``error``."""
    row = _row(family, mode, batch, optimizer, tiny)
    reason = skip_reason(mode, optimizer, device)
    if reason:
        row["skipped"] = reason
        return row
    cuda = device.type == "cuda"
    _free(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _measure(family, mode, batch, optimizer, tiny, iters, warmup, device, row)
    except torch.cuda.OutOfMemoryError as e:
        row.update(fit=False, error=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # one broken configuration must not end a long GPU run
        if "out of memory" in str(e).lower():  # e.g. a cuBLAS workspace that could not be allocated
            row["fit"] = False
        logger.exception("bench scale: %s %s batch %d %s failed", family, mode, batch, optimizer)
        row["error"] = f"{type(e).__name__}: {e}"
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    _free(cuda)
    return row


# --- the bench -------------------------------------------------------------------------------------------------
def plan(modes, batches, families) -> list[tuple[str, str, str, int]]:
    """(family, mode, optimizer, batch) of every row: adamw8bit only where the optimizer state is what matters."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected some of {', '.join(MODES)}")
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected some of {', '.join(FAMILIES)}")
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batches must be positive integers, got {list(batches)}")
    return [
        (family, mode, optimizer, int(batch))
        for family in families
        for mode in modes
        for optimizer in (OPTIMIZERS if mode in EIGHT_BIT_MODES else OPTIMIZERS[:1])
        for batch in sorted(batches)
    ]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10**6:
        return f"{v / 1e6:.1f}M"
    return str(v).replace("|", "/")


def markdown(result: dict, iters: int, warmup: int) -> str:
    rows = result["rows"]
    lines = [
        f"# fastdiff bench scale ({result['device']}, torch {result['torch']})",
        "",
        f"DMD2 training iterations on {'tiny' if result['tiny'] else 'full-size'} UNets built from their configs "
        "in random init (no download; SDXL at 1024², SD1.5 at 512², latents at 1/8 of the resolution), with random "
        "text conditioning, through fastdiff's Trainer: "
        f"{'bf16 mixed precision' if result['device'] != 'cpu' else 'float32 (CPU)'}, gradient checkpointing, "
        "1-step students, no GAN term. For the bench `dfake_gen_update_ratio=1`: both parameter groups (generator "
        "and critic = fake score) are updated every iteration, so one iteration is one generator update plus one "
        f"fake-score update. Seconds per iteration are the mean of {iters} timed iterations after {warmup} untimed "
        "warm-up one(s); images per second = batch / s_per_it; peak_gib is torch.cuda.max_memory_allocated over the "
        "whole row (build, warm-up and timed iterations; per process), null on the CPU. shared-base: generator and "
        f"fake score as LoRA adapters (rank lora_rank, alpha {LORA_ALPHA}) on the one frozen teacher UNet; "
        "full-copy: two trainable float32 copies beside the frozen teacher; fsdp: full-copy sharded with FSDP2 "
        "across the processes. fit is False when the row ran out of GPU memory; skipped rows say why.",
        "",
        "| " + " | ".join(FIELDS) + " |",
        "|" + "---|" * len(FIELDS),
    ]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in FIELDS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict, iters: int, warmup: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    (out / "scale.md").write_text(markdown(result, iters, warmup))


def run(
    out,
    tiny: bool = False,
    iters: int = 3,
    batches=(1, 2, 4),
    modes=MODES,
    families=("sdxl", "sd15"),
    warmup: int = 1,
) -> list[dict]:
    """Run every (family, mode, optimizer, batch) row and write ``scale.json`` and ``scale.md`` to ``out`` (after
    every row, so a run stopped early keeps what it measured). Returns the rows.

    Args:
        out: output folder.
        tiny: the tiny UNets on the CPU (a test of the bench) instead of the full-size ones on the GPU.
        iters: timed iterations per row (>= 1); warmup: untimed iterations before them.
        batches / modes / families: what to run (modes from ``MODES``, families from ``FAMILIES``).
    """
    if not tiny and not torch.cuda.is_available():
        raise ValueError(
            "the full-size scale bench needs a CUDA GPU (SDXL at 1024² does not train on a CPU); "
            "use --tiny to run the same code on tiny UNets on the CPU"
        )
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    rows_to_run = plan(tuple(modes), tuple(batches), tuple(families))
    from accelerate import PartialState

    state = PartialState(
        cpu=tiny
    )  # joins the process group under `accelerate launch` (the fsdp rows need it)
    device = torch.device("cpu") if tiny else state.device
    rank = _world()[0]
    out = Path(out)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": bool(tiny),
        "rows": [],
    }
    failed: set[tuple] = set()  # (family, mode, optimizer) that ran out of memory: larger batches are skipped
    for family, mode, optimizer, batch in rows_to_run:
        key = (family, mode, optimizer)
        if key in failed:
            row = _row(family, mode, batch, optimizer, tiny)
            row.update(fit=False, skipped="a smaller batch did not fit")
        else:
            row = run_row(family, mode, batch, optimizer, tiny, iters, warmup, device)
            if row["fit"] is False:
                failed.add(key)
        result["rows"].append(row)
        if rank == 0:
            logger.info("bench scale: %s", json.dumps(row))
            _write(out, result, iters, warmup)
    return result["rows"]
