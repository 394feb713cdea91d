"""MSD's export: the teacher's pipeline with a ``students`` component (``pipelines/multi_student.py``'s
``StudentRouter``: the routing table, centroids and every student's weights) as one multi-student pipeline folder.

    out/pipeline/               model_index.json, the teacher's components, students/ (router + students),
                                multi_student.py (the pipeline class)
    out/lora/student_<k>/       each LoRA student, diffusers and kohya files (written by fastdiff.export)
    out/fastdiff.json           the recipe; ``students`` says K, the partition and the LoRA folders

LoRA students ride on the teacher's UNet (``unet``) as peft adapters ``student_<k>``; whole students (smaller or
full copies) are UNets: student 0 is the pipeline's ``unet``, students 1.. live in ``students/student_<k>/``.
"""

from __future__ import annotations

import copy

import torch

PIPELINE_CLASSES = {
    "sdxl": "StableDiffusionXLMultiStudentPipeline",
    "sd15": "StableDiffusionMultiStudentPipeline",
}


def build_pipeline(method, teacher):
    """The multi-student pipeline of a trained MSD method on ``teacher`` (its components re-read in float32)."""
    from diffusers import DiffusionPipeline

    from ...models.lora import adapter_metadata, adapter_state_dict
    from ...paths import pipeline_module
    from ...recipe import make_scheduler

    if teacher.family not in PIPELINE_CLASSES:
        raise ValueError(
            f"MSD exports support {', '.join(PIPELINE_CLASSES)} teachers, not {teacher.family!r}"
        )
    module = pipeline_module("multi_student")
    partition = method.partition
    if partition is None:
        raise RuntimeError(
            "msd: nothing to export without the partition (train, or load a checkpoint's state)"
        )
    students = [s.exported_student() for s in method.students]
    lora = all(s.adapter is not None for s in students)
    base = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
    recipe = method.recipe(dict(teacher.pipeline.scheduler.config))  # the call the students were trained for
    router = module.StudentRouter(
        num_students=len(students),
        embedding_dim=partition.centroids.shape[1],
        table=partition.table,
        kind="lora" if lora else "unet",
        lora_configs=[adapter_metadata(s.unet, s.adapter) for s in students] if lora else None,
        num_inference_steps=recipe.num_inference_steps,
        guidance_scale=recipe.guidance_scale,
        step_counts=recipe.allowed_steps(),
    )
    router.centroids.copy_(partition.centroids)
    if lora:
        router.lora_weights = [
            {k: v.float().cpu() for k, v in adapter_state_dict(s.unet, s.adapter).items()} for s in students
        ]
        unet = base.unet
    else:
        unets = [copy.deepcopy(s.unet).float().cpu().eval() for s in students]
        unet, router.unets = unets[0], torch.nn.ModuleList(unets[1:])
    extra = {}
    if teacher.family == "sdxl":
        extra["force_zeros_for_empty_prompt"] = base.config.force_zeros_for_empty_prompt
    components = {
        k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor", "unet")
    }
    pipe = getattr(module, PIPELINE_CLASSES[teacher.family])(
        **components, unet=unet, students=router, **extra
    )
    pipe.scheduler = make_scheduler(base.scheduler.config, recipe.scheduler, recipe.scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_card(recipe: dict, grid: str) -> str:
    from ...export import card_front_matter, lora_base_note, pipeline_file_prefix, pipeline_ref

    info, steps = recipe["students"], recipe["num_inference_steps"]
    cls, k = recipe["pipeline_class"], info["num_students"]
    loras = info["lora"] or []
    lora_lines = "".join(f"- `{p}/`\n" for p in loras) or "- (whole-UNet students: no LoRA files)\n"
    base = f"\n{lora_base_note(recipe, fused=False)}\n" if loras else ""
    where, files = pipeline_ref(recipe), pipeline_file_prefix(recipe)
    return f"""{card_front_matter(recipe, ["one-step"])}# MSD: {k} one-step students of `{recipe["teacher"]}`

Multi-student distillation (fastdiff {recipe["fastdiff_version"]}): {k} DMD2 students, each trained on its own
slice of the prompts (partition: {info["partition"]}, prompts per student {info["sizes"]}); the pipeline embeds
every prompt, routes it to its student and runs that student alone ({steps} step, one UNet call per image). A
training prompt goes to its student by the saved table, any other prompt to the nearest centroid.

## Load with diffusers (runs `{files}multi_student.py` from this folder)

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({where}, trust_remote_code=True)
images = pipe(["a photo of a cat", "a red car"], num_inference_steps={steps}, guidance_scale=0.0).images
pipe.route(["a photo of a cat"])  # which student serves a prompt
```

## Load with fastdiff (no code from the folder runs)

```python
from fastdiff.pipelines import {cls}

pipe = {cls}.from_pretrained({where})
```

or `fastdiff generate . "a photo of a cat"`, which reads the call from `fastdiff.json`.

## Students as LoRA files (diffusers and kohya formats)

{lora_lines}
Each is a LoRA of the teacher UNet for the prompts routed to it (`fastdiff serve` routes a request to it).
{base}
## Samples

![samples]({grid})
"""
