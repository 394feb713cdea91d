"""Exports: a standard diffusers pipeline folder, LoRA weights (diffusers/PEFT + kohya), fastdiff.json, model card.

The saved scheduler derives the trained timesteps from ``num_inference_steps`` alone, so
``pipe(prompt, num_inference_steps=N, guidance_scale=0.0)`` is the whole recipe:
- K student steps at LCM's own timesteps (e.g. [999, 749, 499, 249]): ``LCMScheduler(original_inference_steps=K)``,
  whose step is fastdiff's sampler (x0, then fresh noise to the next timestep);
- one step at t != 999 (DMD2 SDXL's t=399): ``DDIMScheduler(timestep_spacing="leading", steps_offset=t)``, which
  at one step returns the x0 prediction exactly;
- anything else: LCMScheduler plus an explicit ``timesteps`` list, recorded as not derivable in fastdiff.json
  and the model card.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__

logger = logging.getLogger("fastdiff")
RECIPE_FILE = "fastdiff.json"


def derive_scheduler(scheduler_config: dict, timesteps: list[int], sampler: str = "lcm", also=()):
    """A diffusers scheduler whose ``set_timesteps(len(timesteps))`` gives ``timesteps``; (scheduler, derivable).

    ``sampler`` is how the student samples: "lcm" (x0, then fresh noise to the next timestep: DMD2) or "ddim"
    (deterministic DDIM between trailing timesteps: consistency students such as TSCD). ``also``: more timestep
    lists the same scheduler must derive from their lengths (a student trained at several step counts, as few-step
    SiD: LCMScheduler(original_inference_steps=T) gives T-1 - floor(T i / k) at every k).
    """
    from diffusers import DDIMScheduler, LCMScheduler

    n = len(timesteps)
    wanted = [list(timesteps), *(list(ts) for ts in also)]
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(
            scheduler_config,
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            clip_sample=False,
            thresholding=False,
        )
        sched.set_timesteps(n)
        return sched, sched.timesteps.tolist() == list(timesteps)
    candidates = [LCMScheduler.from_config(scheduler_config, original_inference_steps=n)]
    if n == 1:
        candidates.append(
            DDIMScheduler.from_config(
                scheduler_config,
                timestep_spacing="leading",
                steps_offset=timesteps[0],
                clip_sample=False,
                set_alpha_to_one=True,
                thresholding=False,
            )
        )
    candidates.append(
        LCMScheduler.from_config(
            scheduler_config, original_inference_steps=scheduler_config.get("num_train_timesteps", 1000)
        )
    )

    def derives(sched, ts) -> bool:
        sched.set_timesteps(len(ts))
        return sched.timesteps.tolist() == ts

    for sched in candidates:
        if all(derives(sched, ts) for ts in wanted):
            sched.set_timesteps(n)
            return sched, True
    return candidates[0], False


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """[N, 3, H, W] images in [0, 1] -> one PIL grid with ``rows`` rows."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(grid)


def read_recipe(folder: str | Path) -> dict:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fastdiff export: {RECIPE_FILE} is missing")
    return json.loads(path.read_text())


def load_pipeline(folder: str | Path, **kwargs):
    """A saved pipeline folder: a standard diffusers pipeline, or one of fastdiff's custom pipelines (an export
    whose model_index.json names a file of ``pipelines/``), loaded with fastdiff's own copy of that class so that
    no code from the folder runs."""
    import importlib

    from diffusers import DiffusionPipeline

    from .teacher import check_pipeline_folder

    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if isinstance(name, list):
        try:
            module = importlib.import_module(f"pipelines.{name[0]}") if name[0].isidentifier() else None
        except ImportError:
            module = None
        if getattr(module, name[1], None) is None:
            raise ValueError(f"{folder} needs the pipeline {name[1]} from {name[0]}.py, unknown to fastdiff")
        cls = getattr(module, name[1])
        return cls.from_pretrained(folder, **kwargs)
    check_pipeline_folder(folder)
    return DiffusionPipeline.from_pretrained(folder, **kwargs)


def pipeline_kwargs(recipe: dict) -> dict:
    """The call arguments that reproduce the trained sampler."""
    kw = {"num_inference_steps": recipe["num_inference_steps"], "guidance_scale": recipe["guidance_scale"]}
    if not recipe.get("timesteps_derivable", True):
        kw["timesteps"] = recipe["timesteps"]
    return kw


def export(
    method,
    teacher,
    config: dict,
    out_dir: str | Path,
    lora_scale: float = 1.0,
    prompts=None,
    train_seconds=None,
) -> Path:
    """Write ``pipeline/``, ``lora/`` (when the generator is a LoRA), ``fastdiff.json`` and ``README.md``.

    Args:
        method: the trained method; ``method.generator`` is a UNetDenoiser (its ``adapter`` names the LoRA).
        teacher: the loaded Teacher (its folder supplies the other pipeline components, re-read in float32).
        config: the run config as a dict (recorded in fastdiff.json).
        out_dir: the export folder.
        lora_scale: recommended LoRA scale.
        prompts: prompts of the model card's sample grid.
        train_seconds: wall time of the training run, recorded in fastdiff.json.
    """
    if getattr(method, "name", None) == "agd":  # adapters on the frozen teacher: an adapter-guidance pipeline
        from .methods.agd.export import export_agd

        return export_agd(method, teacher, config, out_dir, prompts, train_seconds)
    from diffusers import DiffusionPipeline

    from .models.lora import save_lora

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.float()  # training is over: compare and export in full precision
    teacher.to_float32()
    gen = method.generator
    timesteps = list(method.student_timesteps)
    pipe = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    is_lora = gen.adapter not in ("*", None)
    if is_lora:
        shutil.rmtree(out / "lora", ignore_errors=True)
        save_lora(out / "lora", gen.unet, gen.adapter, type(pipe))
        pipe.load_lora_weights(
            out / "lora"
        )  # the merge goes through diffusers' own loader: the file is proven
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    else:
        pipe.unet.load_state_dict({k: v.float() for k, v in gen.unet.state_dict().items()})
    sampler = getattr(method, "sampler", "lcm")
    by_steps = getattr(method, "timesteps_by_steps", None) or {}  # a student trained at several step counts
    scheduler, derivable = derive_scheduler(
        dict(pipe.scheduler.config), timesteps, sampler, by_steps.values()
    )
    pipe.scheduler = scheduler
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    recipe = {
        "method": method.name,
        "num_inference_steps": len(timesteps),
        "guidance_scale": 0.0,
        "timesteps": timesteps,
        "timesteps_derivable": derivable,
        "scheduler": type(scheduler).__name__,
        "sampler": sampler,
        "lora_scale": lora_scale if is_lora else None,
        "lora": "lora/pytorch_lora_weights.safetensors" if is_lora else None,
        "pipeline_class": type(pipe).__name__,
        "teacher": teacher.path,
        "fastdiff_version": __version__,
        "train_seconds": train_seconds,
        "config": config,
    }
    if sampler == "ddim":  # one LoRA for several step counts: the recipe of each (Hyper-SD's usage)
        recipe["recipes"] = {
            str(k): {
                "num_inference_steps": k,
                "guidance_scale": 0.0,
                "scheduler": "TCDScheduler" if k == 1 else "DDIMScheduler",
                **({"eta": 1.0} if k == 1 else {"timestep_spacing": "trailing"}),
            }
            for k in (1, 2, 4, 8)
        }
    if len(by_steps) > 1:  # one generator for every k <= K (few-step SiD's uniform mixture)
        recipe["recipes"] = {
            str(k): {
                "num_inference_steps": k,
                "guidance_scale": 0.0,
                "scheduler": type(scheduler).__name__,
                "timesteps": list(ts),
                "timesteps_derivable": derivable,
            }
            for k, ts in by_steps.items()
        }
    if not derivable:
        logger.warning(
            "timesteps %s cannot be derived by a scheduler config: pass timesteps= explicitly", timesteps
        )
    recipe["check"] = _self_check(method, teacher, pipe, recipe)
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    grid_path = _sample_grid(pipe, recipe, out, prompts or ["a photo of a cat"])
    (out / "README.md").write_text(model_card(recipe, grid_path.relative_to(out)))
    return out


@torch.no_grad()
def _self_check(method, teacher, pipe, recipe) -> dict:
    """Run the exported pipeline and fastdiff's own sampler on the same noise; record the largest difference."""
    prompt = "a photo of a cat"
    gen = torch.Generator().manual_seed(0)
    kwargs = {"": pipeline_kwargs(recipe)}
    kwargs.update({k: pipeline_kwargs(r) for k, r in recipe.get("recipes", {}).items() if "timesteps" in r})
    diffs = {}
    for k, kw in kwargs.items():
        gen = torch.Generator().manual_seed(0)
        latents = pipe(prompt, **kw, generator=gen, output_type="latent").images
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(teacher.device)
        ours = method.generate(
            noise, teacher.encode([prompt]), timesteps=int(k) if k else None, generator=gen
        )
        diffs[k] = float((ours.float().cpu() - latents.float().cpu()).abs().max())
        if diffs[k] > 1e-3:
            logger.warning(
                "exported pipeline differs from fastdiff's sampler by %.3g (max abs, latents%s)",
                diffs[k],
                f", {k} steps" if k else "",
            )
    check = {"prompt": prompt, "seed": 0, "max_abs_diff_latents": diffs.pop("")}
    if diffs:
        check["max_abs_diff_latents_by_steps"] = diffs
    return check


@torch.no_grad()
def _sample_grid(pipe, recipe, out: Path, prompts: list[str]) -> Path:
    images = []
    for i, prompt in enumerate(prompts):
        img = pipe(
            prompt, **pipeline_kwargs(recipe), generator=torch.Generator().manual_seed(i), output_type="pt"
        )
        images.append(img.images[0])
    (out / "samples").mkdir(exist_ok=True)
    path = out / "samples" / "export_grid.png"
    image_grid(torch.stack(images), rows=1).save(path)
    return path


def model_card(recipe: dict, grid: Path) -> str:
    steps, cls = recipe["num_inference_steps"], recipe["pipeline_class"]
    ts = "" if recipe["timesteps_derivable"] else f", timesteps={recipe['timesteps']}"
    lora = ""
    if recipe["lora"]:
        lora = f"""
## As a LoRA on the teacher

```python
import torch
from diffusers import {cls}, {recipe["scheduler"]}

pipe = {cls}.from_pretrained("{recipe["teacher"]}")
pipe.load_lora_weights("lora")  # or weight_name="kohya_lora.safetensors" (kohya / ComfyUI keys)
pipe.fuse_lora(lora_scale={recipe["lora_scale"]})
pipe.scheduler = {recipe["scheduler"]}.from_pretrained("pipeline", subfolder="scheduler")
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0.0{ts}).images[0]
```
"""
    note = ""
    if not recipe["timesteps_derivable"]:
        note = f"\n**Note:** the trained timesteps {recipe['timesteps']} cannot be derived by a scheduler config: pass them.\n"
    return f"""---
library_name: diffusers
tags: [fastdiff, {recipe["method"]}, distillation]
---
# {recipe["method"].upper()} {steps}-step student of `{recipe["teacher"]}`

Distilled with fastdiff {recipe["fastdiff_version"]} ({recipe["method"]}). Trained timesteps: {recipe["timesteps"]}
(scheduler: {recipe["scheduler"]}, derived from `num_inference_steps` alone: {recipe["timesteps_derivable"]}).
{note}
## Standard pipeline

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("pipeline")
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0.0{ts}).images[0]
```

or `fastdiff generate . "a photo of a cat"`, which reads these arguments from `fastdiff.json`.
{lora}
## Samples

![samples]({grid.as_posix()})
"""
