"""Exports: a diffusers pipeline folder, LoRA weights (diffusers/PEFT + kohya), fastdiff.json and a model card.

Method-agnostic: the method declares what is exported (``exported_student``: a whole UNet or a LoRA adapter on the
teacher's UNet, with more weights of that adapter as LoRA variants; or ``export_pipeline``, a pipeline of its own)
and how it samples (``recipe``, see ``fastdiff.recipe``). The saved scheduler derives the trained timesteps from
``num_inference_steps`` alone, so ``pipe(prompt, **fastdiff.json's call)`` is the whole recipe; a step count whose
recipe names a LoRA variant runs the teacher with ``lora/<variant>/`` fused in.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .recipe import RECIPE_FILE, Recipe, apply_scheduler, load_pipeline, load_step_pipeline, make_scheduler

logger = logging.getLogger("fastdiff")


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


def export(
    method,
    teacher,
    config: dict,
    out_dir: str | Path,
    lora_scale: float = 1.0,
    prompts=None,
    train_seconds=None,
) -> Path:
    """Write ``pipeline/``, ``lora/`` (when the student is a LoRA; its variants in ``lora/<name>/``),
    ``fastdiff.json`` and ``README.md``.

    Args:
        method: the trained method (its ``exported_student`` / ``export_pipeline`` and ``recipe``).
        teacher: the loaded Teacher (its folder supplies the other pipeline components, re-read in float32).
        config: the run config as a dict (recorded in fastdiff.json).
        out_dir: the export folder.
        lora_scale: recommended LoRA scale.
        prompts: prompts of the model card's sample grid.
        train_seconds: wall time of the training run, recorded in fastdiff.json.
    """
    from diffusers import DiffusionPipeline

    from .models.lora import save_lora

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.float()  # training is over: compare and export in full precision
    teacher.to_float32()
    recipe: Recipe = method.recipe(dict(teacher.pipeline.scheduler.config))
    pipe = method.export_pipeline(teacher)
    lora, student = None, None
    if pipe is None:  # the standard pipeline of the teacher's class with the student's weights
        student = method.exported_student()
        pipe = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
        if student.adapter is not None:
            shutil.rmtree(out / "lora", ignore_errors=True)
            save_lora(out / "lora", student.unet, student.adapter, type(pipe))
            for name in student.variants:
                with _variant_weights(student, name):
                    save_lora(out / "lora" / name, student.unet, student.adapter, type(pipe))
            pipe.load_lora_weights(
                out / "lora"
            )  # the merge goes through diffusers' own loader: the file is proven
            pipe.fuse_lora(lora_scale=lora_scale)
            pipe.unload_lora_weights()
            lora = "lora/pytorch_lora_weights.safetensors"
        else:
            pipe.unet.load_state_dict({k: v.float() for k, v in student.unet.state_dict().items()})
        pipe.scheduler = make_scheduler(pipe.scheduler.config, recipe.scheduler, recipe.scheduler_kwargs)
    for name, extra in method.exported_loras().items():  # e.g. MSD's students, each a LoRA of its own
        shutil.rmtree(out / "lora" / name, ignore_errors=True)
        save_lora(out / "lora" / name, extra.unet, extra.adapter, type(pipe))
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    pipe = load_pipeline(out / "pipeline", use_safetensors=True)  # check what was written, not the copy
    pipe.set_progress_bar_config(disable=True)
    if recipe.timesteps_derivable and not _derives(
        pipe.scheduler, recipe.num_inference_steps, recipe.timesteps
    ):
        # a pipeline may rewrite its scheduler's config on load (StableDiffusionPipeline resets steps_offset to 1):
        # then the call passes the trained timesteps to an LCMScheduler, which accepts them
        logger.warning(
            "the saved pipeline's scheduler does not derive %s: timesteps are passed", recipe.timesteps
        )
        recipe.scheduler, recipe.timesteps_derivable = "LCMScheduler", False
        recipe.scheduler_kwargs = {"original_inference_steps": recipe.num_inference_steps}
        pipe.scheduler = make_scheduler(pipe.scheduler.config, recipe.scheduler, recipe.scheduler_kwargs)
        pipe.scheduler.save_pretrained(out / "pipeline" / "scheduler")
    if not recipe.timesteps_derivable:
        logger.warning(
            "timesteps %s cannot be derived by a scheduler config: pass timesteps= explicitly",
            recipe.timesteps,
        )
    data = {
        **recipe.to_json(),
        "lora_scale": lora_scale if lora else None,
        "lora": lora,
        "pipeline_class": type(pipe).__name__,
        "teacher": teacher.path,
        "fastdiff_version": __version__,
        "train_seconds": train_seconds,
        "config": config,
    }
    data["check"] = _self_check(
        method, teacher, pipe, recipe, out, student, lora_scale, config.get("resolution")
    )
    (out / RECIPE_FILE).write_text(json.dumps(data, indent=2))
    inputs = teacher.example_inputs(prompts or ["a photo of a cat"], config.get("resolution"))
    grid = _sample_grid(pipe, recipe, out, inputs).relative_to(out).as_posix()
    (out / "README.md").write_text(method.model_card(data, grid) or model_card(data, grid))
    return out


def _derives(scheduler, num_inference_steps: int, timesteps: list) -> bool:
    """Whether ``scheduler.set_timesteps(num_inference_steps)`` gives ``timesteps``."""
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.tolist() == list(timesteps)


def _run(pipe, step, inputs: dict, seed: int, **kwargs):
    """``pipe`` called on ``inputs`` (prompt, and image where the pipeline takes one) as the step recipe says (its
    scheduler swapped in for the call)."""
    base = pipe.scheduler
    apply_scheduler(pipe, step)
    try:
        return pipe(
            **inputs, **step.call_kwargs(), generator=torch.Generator().manual_seed(seed), **kwargs
        ).images
    finally:
        pipe.scheduler = base


@contextmanager
def _variant_weights(student, name: str):
    """Run a block with the student adapter holding the weights of its variant ``name``, then restore them."""
    weights = student.variants[name]
    params = dict(student.unet.named_parameters(remove_duplicate=False))
    missing = sorted(set(weights) - set(params))
    if missing:
        raise KeyError(f"LoRA variant {name!r} names parameters the student does not have: {missing[:3]}")
    current = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in current.items():
                params[n].copy_(w)


@torch.no_grad()
def _self_check(
    method, teacher, pipe, recipe: Recipe, out: Path, student, lora_scale: float, resolution=None
) -> dict:
    """Run the exported pipeline and fastdiff's own sampler on the same noise, at the default call and at every
    step count the export declares; record the largest difference.

    A step count with a LoRA variant runs as its consumers do (the teacher with ``lora/<variant>`` fused in)
    against the sampler with the variant's weights in the student; a step recipe's ``eta`` reaches the method's
    ``generate`` as ``eta``."""
    prompt = "a photo of a cat"
    inputs = teacher.example_inputs([prompt], resolution)[0]
    checks = {None: recipe.for_steps()} | {k: recipe.for_steps(k) for k in recipe.allowed_steps() or []}
    variants = student.variants if student is not None and student.adapter is not None else {}
    source = {"teacher": teacher.path, "lora_scale": lora_scale}
    pipes = {None: pipe}
    diffs = {}
    for k, step in checks.items():
        name = Path(step.lora).relative_to("lora").as_posix() if step.lora else None
        if name is not None and name not in variants:
            raise ValueError(f"the {k}-step recipe names {step.lora}, not a LoRA variant of the student")
        if step.lora not in pipes:
            pipes[step.lora] = load_step_pipeline(out, step, source, use_safetensors=True)
            pipes[step.lora].set_progress_bar_config(disable=True)
        latents = _run(pipes[step.lora], step, inputs, 0, output_type="latent")
        gen = torch.Generator().manual_seed(0)
        cond = teacher.call_cond(inputs, step.call_kwargs(), gen)  # draws what the pipeline draws first
        noise = torch.randn((1, *latents.shape[1:]), generator=gen).to(teacher.device)
        kwargs = {"eta": step.eta} if step.eta else {}
        with _variant_weights(student, name) if name else nullcontext():
            ours = method.generate(noise, cond, timesteps=k, generator=gen, **kwargs)
        diffs[k] = float((ours.float().cpu() - latents.float().cpu()).abs().max())
        if diffs[k] > 1e-3:
            logger.warning(
                "exported pipeline differs from fastdiff's sampler by %.3g (max abs, latents%s)",
                diffs[k],
                f", {k} steps" if k else "",
            )
    check = {"prompt": inputs["prompt"], "seed": 0, "max_abs_diff_latents": diffs.pop(None)}
    if diffs:
        check["max_abs_diff_latents_by_steps"] = {str(k): v for k, v in diffs.items()}
    return check


@torch.no_grad()
def _sample_grid(pipe, recipe: Recipe, out: Path, inputs: list[dict]) -> Path:
    """One row of samples; for image inputs (an upscaler) a before/after grid: the inputs (nearest-neighbour
    enlarged to the output size) above the outputs."""
    import torch.nn.functional as F

    step = recipe.for_steps()
    images = torch.stack([_run(pipe, step, call, i, output_type="pt")[0] for i, call in enumerate(inputs)])
    rows = 1
    if all("image" in call for call in inputs):
        before = torch.stack(
            [torch.from_numpy(np.asarray(c["image"].convert("RGB"))).permute(2, 0, 1) for c in inputs]
        )
        before = F.interpolate(before.float() / 255, size=images.shape[-2:], mode="nearest")
        images, rows = torch.cat([before, images.float().cpu()]), 2
    (out / "samples").mkdir(exist_ok=True)
    path = out / "samples" / "export_grid.png"
    image_grid(images, rows=rows).save(path)
    return path


def model_card(recipe: dict, grid: str) -> str:
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
    per_step = {k: r for k, r in (recipe.get("recipes") or {}).items() if r.get("lora")}
    if per_step:
        rows = "\n".join(
            f"| {k} | `{r['lora']}` | {r['scheduler']} {r['scheduler_kwargs']} |" for k, r in per_step.items()
        )
        k, r = next(iter(per_step.items()))
        lora += f"""
## A LoRA per step count

These step counts have a LoRA of their own, fused into the teacher in place of `lora/` (`fastdiff generate
--steps N` picks it; `fastdiff.json`'s `recipes` lists every count):

| steps | LoRA | scheduler (on the teacher's scheduler config) |
|---|---|---|
{rows}

```python
from diffusers import {cls}, {r["scheduler"]}

pipe = {cls}.from_pretrained("{recipe["teacher"]}")
pipe.load_lora_weights("{r["lora"]}")
pipe.fuse_lora(lora_scale={recipe["lora_scale"]})
pipe.scheduler = {r["scheduler"]}.from_config(pipe.scheduler.config, **{r["scheduler_kwargs"]})
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=0.0).images[0]
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

![samples]({grid})
"""
