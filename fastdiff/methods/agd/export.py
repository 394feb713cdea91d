"""AGD exports: the teacher pipeline + the trained guidance adapters as one adapter-guidance pipeline folder.

    out/pipeline/               model_index.json, the teacher's components, adapters/ (safetensors + config +
                                guidance_adapters.py), adapter_guidance.py (the pipeline class)
    out/fastdiff.json           method, num_inference_steps, guidance_scale, scheduler, timesteps, w range, self-check
    out/README.md               model card: both ways to load, negative prompts, schedulers, a student LoRA on top

``DiffusionPipeline.from_pretrained("out/pipeline", trust_remote_code=True)`` runs the folder's copy of
``pipelines/adapter_guidance.py``; ``StableDiffusionXLAdapterGuidancePipeline.from_pretrained("out/pipeline")``
(from ``fastdiff.pipelines``) loads the same folder with fastdiff's own code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ... import __version__
from ...export import RECIPE_FILE, _sample_grid, _self_check

PIPELINE_CLASSES = {
    "sdxl": "StableDiffusionXLAdapterGuidancePipeline",
    "sd15": "StableDiffusionAdapterGuidancePipeline",
}


def pipeline_class(family: str):
    import pipelines.adapter_guidance as module

    if family not in PIPELINE_CLASSES:
        raise ValueError(f"AGD exports support {', '.join(PIPELINE_CLASSES)} teachers, not {family!r}")
    return getattr(module, PIPELINE_CLASSES[family])


def build_pipeline(method, teacher):
    """The adapter-guidance pipeline: the teacher's components (fp32, from its folder), a copy of the trained
    adapters and the method's scheduler."""
    from diffusers import DiffusionPipeline

    from ...models.adapters import GuidanceAdapters
    from .method import fresh

    base = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
    adapters = GuidanceAdapters.from_config(method.adapters.config)
    adapters.load_state_dict({k: v.detach().float().cpu() for k, v in method.adapters.state_dict().items()})
    extra = {}
    if teacher.family == "sdxl":
        extra["force_zeros_for_empty_prompt"] = base.config.force_zeros_for_empty_prompt
    components = {
        k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")
    }
    pipe = pipeline_class(teacher.family)(**components, adapters=adapters, **extra)
    pipe.scheduler = fresh(method.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_agd(method, teacher, config: dict, out_dir, prompts=None, train_seconds=None) -> Path:
    """Write ``pipeline/`` (teacher + adapters + pipeline code), ``fastdiff.json`` and ``README.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.float()
    teacher.to_float32()
    pipe = build_pipeline(method, teacher)
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    cls = type(pipe)
    pipe = cls.from_pretrained(out / "pipeline", use_safetensors=True)  # check what was written, not the copy
    pipe.set_progress_bar_config(disable=True)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    adapter_params = sum(p.numel() for p in pipe.adapters.parameters())
    cfg = method.cfg
    recipe = {
        "method": method.name,
        "num_inference_steps": method.num_inference_steps,
        "guidance_scale": method.guidance_scale,
        "timesteps": method.student_timesteps,
        "timesteps_derivable": True,
        "scheduler": type(pipe.scheduler).__name__,
        "sampler": "scheduler",  # any diffusers scheduler: the adapters replace CFG, not the sampler
        "nfe_per_step": 1,
        "w_range": [cfg.w_min, cfg.w_max],
        "lora_scale": None,
        "lora": None,
        "pipeline_class": cls.__name__,
        "pipeline_file": "pipeline/adapter_guidance.py",
        "adapters": {
            "parameters": adapter_params,
            "unet_parameters": unet_params,
            "fraction_of_unet": adapter_params / unet_params,
        },
        "teacher": teacher.path,
        "fastdiff_version": __version__,
        "train_seconds": train_seconds,
        "trajectory_seconds": getattr(method, "trajectory_seconds", None),
        "config": config,
    }
    recipe["check"] = _self_check(method, teacher, pipe, recipe)
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    grid = _sample_grid(pipe, recipe, out, prompts or ["a photo of a cat"])
    (out / "README.md").write_text(model_card(recipe, grid.relative_to(out)))
    return out


def model_card(recipe: dict, grid: Path) -> str:
    cls, steps, w = recipe["pipeline_class"], recipe["num_inference_steps"], recipe["guidance_scale"]
    lo, hi = recipe["w_range"]
    share = 100 * recipe["adapters"]["fraction_of_unet"]
    return f"""---
library_name: diffusers
tags: [fastdiff, agd, guidance-distillation]
---
# AGD guidance adapters for `{recipe["teacher"]}`

Adapter guidance distillation (fastdiff {recipe["fastdiff_version"]}): small cross-attention adapters
({recipe["adapters"]["parameters"]:,} parameters, {share:.1f}% of the UNet) after every cross-attention block of the
frozen teacher UNet reproduce classifier-free guidance in **one UNet forward per step** (CFG needs two). Trained on
the teacher's CFG trajectories for w in [{lo}, {hi}]; recommended: {steps} steps, guidance_scale={w}
({recipe["scheduler"]}).

## Load with diffusers (runs `pipeline/adapter_guidance.py` from this folder)

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("pipeline", trust_remote_code=True)
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={w}).images[0]
```

## Load with fastdiff (no code from the folder runs)

```python
from fastdiff.pipelines import {cls}

pipe = {cls}.from_pretrained("pipeline")
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={w}).images[0]
```

or `fastdiff generate . "a photo of a cat"`, which reads these arguments from `fastdiff.json`.

## Options

- `guidance_scale`: any w in [{lo}, {hi}] goes to the adapters (outside it they extrapolate, with a warning).
- `negative_prompt="blurry"`: the negative prompt conditions the adapters (still one UNet call per step).
- Any scheduler: `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`.
- A step-distilled student LoRA on top: `pipe.load_lora_weights("student/lora")`, then sample with the student's
  scheduler and step count; the adapters keep guiding.

## Samples

![samples]({grid.as_posix()})
"""
