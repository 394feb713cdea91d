"""``fastdiff bench speed``: DMD2 training throughput and memory (full copies vs shared base), and the latency of a
1-step export against the teacher at 25 steps with CFG. Each training configuration runs in its own process so
that peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

UNET_SD15_20M = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(48, 96, 192, 192),  # about 19M parameters
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=16,
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _teacher_folder(kind: str, root: Path) -> str:
    from ..models.tiny import save_tiny, tiny_pipeline

    if kind == "tiny-sdxl":
        return str(save_tiny("sdxl", root / kind))
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipeline("sd15")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**UNET_SD15_20M)
    pipe.save_pretrained(root / kind, safe_serialization=True)
    return str(root / kind)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def train_worker(teacher: str, mode: str, batch: int, iters: int, lora_rank: int = 8) -> dict:
    """One configuration: build DMD2, run iterations, time its UNet passes alone. Runs in a fresh process."""
    from ..config import OptimizerConfig, TrainConfig
    from ..methods.dmd2 import DMD2, DMD2Config
    from ..teacher import Teacher
    from ..trainer import Trainer, make_accelerator

    torch.manual_seed(0)
    base_rss = _rss_mb()
    t = Teacher(teacher)
    unet_params = sum(p.numel() for p in t.unet.parameters())
    shared = mode == "shared-base"
    cfg = DMD2Config(
        generator="lora" if shared else "full",
        fake_score="lora" if shared else "full",
        shared_base=shared,
        lora_rank=lora_rank,
        lora_alpha=lora_rank,
        student_timesteps=[999],
        dfake_gen_update_ratio=1,
        optim=OptimizerConfig(weight_decay=0.01, max_grad_norm=10.0),
        guidance_scale=3.0,
    )
    shape = t.latent_shape()
    method = DMD2.from_teacher(t, cfg, shape, with_gan=False)
    tcfg = TrainConfig(
        teacher=teacher,
        output_dir=tempfile.mkdtemp(),
        max_steps=10**9,
        checkpointing_steps=10**9,
        section=cfg,
    )
    cond = t.encode(["a photo of a cat"] * batch)
    trainer = Trainer(method, tcfg, lambda *a: {"cond": cond}, accelerator=make_accelerator(tcfg))
    t_iter = _timed(trainer.train_step, iters)  # one generator and one fake-score update (ratio 1 for timing)
    peak = _rss_mb() - base_rss

    # the same UNet passes alone: generator step = G fwd+bwd, fake fwd, real fwd (CFG: batch 2B);
    # fake step = G fwd, fake fwd+bwd
    gen, fake, real = method.generator, method.fake_score, method.real_score
    x = torch.randn(batch, *shape)
    tt = torch.full((batch,), 500)

    def passes():
        for g in trainer.groups:
            for p in g.params.values():
                p.requires_grad_(g.name == "generator")
        out = gen(x, torch.full((batch,), 999), cond)
        with torch.no_grad():
            fake(x, tt, cond)
            real(x, tt, cond)
        out.mean().backward()
        for g in trainer.groups:
            for p in g.params.values():
                p.requires_grad_(g.name == "critic")
        with torch.no_grad():
            gen(x, torch.full((batch,), 999), cond)
        fake.native(x, tt, cond).mean().backward()
        for g in trainer.groups:
            for p in g.params.values():
                p.grad = None
                p.requires_grad_(False)

    t_passes = _timed(passes, iters)
    from ..models.lora import unique_parameter_bytes

    return {
        "mode": mode,
        "batch": batch,
        "iter_s": t_iter,
        "iters_per_s": 1 / t_iter,
        "unet_passes_s": t_passes,
        "overhead_ratio": t_iter / t_passes,
        "peak_rss_mb": peak,
        "weights_mb": unique_parameter_bytes(method) / 2**20,
        "trainable_params": sum(p.numel() for g in trainer.groups for p in g.params.values()),
        "unet_params": unet_params,
    }


@torch.no_grad()
def latency(teacher: str, steps_teacher: int = 25, cfg: float = 3.0, repeats: int = 5) -> dict:
    """End-to-end pipeline latency (text encoding + UNet + VAE) of a 1-step LCM-scheduled export vs the teacher."""
    from diffusers import DiffusionPipeline, LCMScheduler

    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a cat"
    t_teacher = _timed(lambda: pipe(prompt, num_inference_steps=steps_teacher, guidance_scale=cfg), repeats)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1)
    t_student = _timed(lambda: pipe(prompt, num_inference_steps=1, guidance_scale=0.0), repeats)
    return {
        "teacher_ms": t_teacher * 1e3,
        "student_1step_ms": t_student * 1e3,
        "speedup": t_teacher / t_student,
    }


def run(out: str | None = None, iters: int = 5) -> dict:
    root = Path(tempfile.mkdtemp(prefix="fastdiff-bench-"))
    results = {"device": "cpu", "threads": torch.get_num_threads(), "training": [], "latency": {}}
    for kind, batch, rank in (("tiny-sdxl", 4, 4), ("sd15-20m", 2, 16)):
        folder = _teacher_folder(kind, root)
        for mode in ("full-copy", "shared-base"):
            code = (
                "import json,sys; from fastdiff.eval.bench_speed import train_worker; "
                f"print('RESULT'+json.dumps(train_worker({folder!r}, {mode!r}, {batch}, {iters}, {rank})))"
            )
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
            if proc.returncode or not line:
                raise RuntimeError(f"bench worker failed ({kind}, {mode}):\n{proc.stderr[-3000:]}")
            row = {"teacher": kind, **json.loads(line[0][6:])}
            results["training"].append(row)
            print(json.dumps(row))
        results["latency"][kind] = latency(folder)
        print(kind, json.dumps(results["latency"][kind]))
    for kind in ("tiny-sdxl", "sd15-20m"):
        rows = {r["mode"]: r for r in results["training"] if r["teacher"] == kind}
        results.setdefault("memory_ratio_shared_over_full", {})[kind] = {
            "peak_rss": rows["shared-base"]["peak_rss_mb"] / rows["full-copy"]["peak_rss_mb"],
            "weights": rows["shared-base"]["weights_mb"] / rows["full-copy"]["weights_mb"],
        }
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results
