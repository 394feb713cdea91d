"""AGD's export: the teacher pipeline + the trained guidance adapters as one adapter-guidance pipeline folder
(``fastdiff.export`` writes it with what ``AGD.export_pipeline`` / ``AGD.recipe`` / ``AGD.model_card`` declare).

    out/pipeline/               model_index.json, the teacher's components, adapters/ (safetensors + config +
                                guidance_adapters.py), adapter_guidance.py (the pipeline class)
    out/fastdiff.json           method, num_inference_steps, guidance_scale, scheduler, timesteps, w range, self-check
    out/README.md               model card: both ways to load, negative prompts, schedulers, a student LoRA on top

``DiffusionPipeline.from_pretrained("out/pipeline", trust_remote_code=True)`` runs the folder's copy of
``pipelines/adapter_guidance.py``; ``StableDiffusionXLAdapterGuidancePipeline.from_pretrained("out/pipeline")``
(from ``fastdiff.pipelines``) loads the same folder with fastdiff's own code.
"""

from __future__ import annotations

import torch

PIPELINE_CLASSES = {
    "sdxl": "StableDiffusionXLAdapterGuidancePipeline",
    "sd15": "StableDiffusionAdapterGuidancePipeline",
}


def pipeline_class(family: str):
    from ...paths import pipeline_module

    module = pipeline_module("adapter_guidance")
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


def model_card(recipe: dict, grid: str) -> str:
    from ...export import card_front_matter, pipeline_file_prefix, pipeline_ref

    cls, steps, w = recipe["pipeline_class"], recipe["num_inference_steps"], recipe["guidance_scale"]
    lo, hi = recipe["w_range"]
    share = 100 * recipe["adapters"]["fraction_of_unet"]
    where, files = pipeline_ref(recipe), pipeline_file_prefix(recipe)
    return f"""{card_front_matter(recipe, ["guidance-distillation"])}# AGD guidance adapters for `{recipe["teacher"]}`

Adapter guidance distillation (fastdiff {recipe["fastdiff_version"]}): small cross-attention adapters
({recipe["adapters"]["parameters"]:,} parameters, {share:.1f}% of the UNet) after every cross-attention block of the
frozen teacher UNet reproduce classifier-free guidance in **one UNet forward per step** (CFG needs two). Trained on
the teacher's CFG trajectories for w in [{lo}, {hi}]; recommended: {steps} steps, guidance_scale={w}
({recipe["scheduler"]}).

## Load with diffusers (runs `{files}adapter_guidance.py` from this folder)

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({where}, trust_remote_code=True)
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={w}).images[0]
```

## Load with fastdiff (no code from the folder runs)

```python
from fastdiff.pipelines import {cls}

pipe = {cls}.from_pretrained({where})
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

![samples]({grid})
"""
