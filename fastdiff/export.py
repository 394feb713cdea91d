"""Exports: a diffusers pipeline folder, LoRA weights (diffusers/PEFT + kohya), fastdiff.json and a model card.

Method-agnostic: the method declares what is exported (``exported_student``: a whole UNet or a LoRA adapter on the
teacher's UNet, with more weights of that adapter as LoRA variants; or ``export_pipeline``, a pipeline of its own)
and how it samples (``recipe``, see ``fastdiff.recipe``). The saved scheduler derives the trained timesteps from
``num_inference_steps`` alone, so ``pipe(prompt, **fastdiff.json's call)`` is the whole recipe; a step count whose
recipe names a LoRA variant runs the teacher with ``lora/<variant>/`` fused in.

Every LoRA of an export goes on the teacher, never on the exported pipeline (which has the student's LoRA fused in):
fastdiff.json's ``lora_base`` (and each LoRA folder's ``fastdiff_lora.json``) records the teacher and a fingerprint
of its UNet, which ``fastdiff.models.lora.check_lora_base`` compares. Two layouts: the default keeps the pipeline in
``pipeline/``; the hub layout (``hub_layout=True``) writes its components and model_index.json at the export's root,
so the folder is itself a loadable diffusers repo with the card, fastdiff.json and ``lora/`` alongside.
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

PIPELINE_FOLDER = "pipeline"  # the exported pipeline's folder in the default layout

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
    hub_layout: bool = False,
) -> Path:
    """Write the pipeline (``pipeline/``, or the root with ``hub_layout``), ``lora/`` (when the student is a LoRA;
    its variants in ``lora/<name>/``), ``fastdiff.json`` and ``README.md``.

    Args:
        method: the trained method (its ``exported_student`` / ``export_pipeline`` and ``recipe``).
        teacher: the loaded Teacher (its folder supplies the other pipeline components, re-read in float32).
        config: the run config as a dict (recorded in fastdiff.json); its ``teacher`` is the teacher as given
            (default: the loaded teacher's path).
        out_dir: the export folder.
        lora_scale: recommended LoRA scale.
        prompts: prompts of the model card's sample grid.
        train_seconds: wall time of the training run, recorded in fastdiff.json.
        hub_layout: write the pipeline's components and model_index.json at the export's root (a folder that
            ``DiffusionPipeline.from_pretrained`` loads and a model hub takes as a repo) instead of in ``pipeline/``.
    """
    from diffusers import DiffusionPipeline

    from .models.lora import LORA_INFO_FILE, lora_base_record, save_lora

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method.float()  # training is over: compare and export in full precision
    teacher.to_float32()
    given, teacher_path = str(config.get("teacher") or teacher.path), str(Path(teacher.path).resolve())
    recipe: Recipe = method.recipe(dict(teacher.pipeline.scheduler.config))
    pipe = method.export_pipeline(teacher)
    extra_loras = method.exported_loras()
    lora, student, lora_base = None, None, None
    if pipe is None:  # the standard pipeline of the teacher's class with the student's weights
        student = method.exported_student()
        pipe = DiffusionPipeline.from_pretrained(teacher.path, dtype=torch.float32, use_safetensors=True)
        if student.adapter is not None:
            loras = [
                "lora",
                *(f"lora/{name}" for name in student.variants),
                *(f"lora/{n}" for n in extra_loras),
            ]
            lora_base = lora_base_record(pipe.unet, given, teacher_path, loras)  # before the fuse below
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
    for name, extra in extra_loras.items():  # e.g. MSD's students, each a LoRA of its own
        shutil.rmtree(out / "lora" / name, ignore_errors=True)
        save_lora(out / "lora" / name, extra.unet, extra.adapter, type(pipe))
    if extra_loras and lora_base is None:
        unet = type(teacher.unet).from_pretrained(
            teacher.path, subfolder="unet", dtype=torch.float32, use_safetensors=True
        )
        lora_base = lora_base_record(unet, given, teacher_path, [f"lora/{n}" for n in extra_loras])
    for folder in lora_base["loras"] if lora_base else []:
        (out / folder / LORA_INFO_FILE).write_text(json.dumps({"lora_base": lora_base}, indent=2))
    pipeline_folder = out if hub_layout else out / PIPELINE_FOLDER
    _clear_pipeline(out)
    pipe.save_pretrained(pipeline_folder, safe_serialization=True)
    pipe = load_pipeline(pipeline_folder, use_safetensors=True)  # check what was written, not the copy
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
        pipe.scheduler.save_pretrained(pipeline_folder / "scheduler")
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
        "layout": "hub" if hub_layout else "default",
        "teacher": given,
        "teacher_path": teacher_path,
        "lora_base": lora_base,
        "card": card_metadata(teacher, given),
        "fastdiff_version": __version__,
        "train_seconds": train_seconds,
        "config": config,
    }
    if hub_layout:  # paths the method recorded inside pipeline/ are at the root
        data.update({k: _at_root(v) for k, v in recipe.extra.items()})
    data["check"] = _self_check(
        method, teacher, pipe, recipe, out, student, lora_scale, config.get("resolution")
    )
    (out / RECIPE_FILE).write_text(json.dumps(data, indent=2))
    inputs = teacher.example_inputs(prompts or ["a photo of a cat"], config.get("resolution"))
    grid = _sample_grid(pipe, recipe, out, inputs).relative_to(out).as_posix()
    (out / "README.md").write_text(method.model_card(data, grid) or model_card(data, grid))
    return out


def _clear_pipeline(out: Path) -> None:
    """Remove a pipeline an earlier export wrote into ``out`` in either layout: ``pipeline/``, or the components,
    pipeline file and model_index.json at the root (a stale one would shadow, or be mixed with, the new one)."""
    shutil.rmtree(out / PIPELINE_FOLDER, ignore_errors=True)
    index = out / "model_index.json"
    if not index.is_file():
        return
    config = json.loads(index.read_text())
    keep = {"lora", "samples", "checkpoints", "logs", PIPELINE_FOLDER}
    for name, value in config.items():
        if not name.startswith("_") and isinstance(value, list) and name not in keep:
            shutil.rmtree(out / name, ignore_errors=True)
    if isinstance(config.get("_class_name"), list):  # a custom pipeline's module file
        (out / f"{config['_class_name'][0]}.py").unlink(missing_ok=True)
    index.unlink()


def _at_root(value):
    """A value of fastdiff.json with every ``pipeline/...`` path (e.g. AGD's ``pipeline_file``) read from the root,
    as the hub layout writes the pipeline."""
    if isinstance(value, dict):
        return {k: _at_root(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_at_root(v) for v in value]
    if isinstance(value, str) and value.startswith(f"{PIPELINE_FOLDER}/"):
        return value.removeprefix(f"{PIPELINE_FOLDER}/")
    return value


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
    source = {"teacher": str(Path(teacher.path).resolve()), "lora_scale": lora_scale}
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
            [torch.from_numpy(np.array(c["image"].convert("RGB"))).permute(2, 0, 1) for c in inputs]
        )
        before = F.interpolate(before.float() / 255, size=images.shape[-2:], mode="nearest")
        images, rows = torch.cat([before, images.float().cpu()]), 2
    (out / "samples").mkdir(exist_ok=True)
    path = out / "samples" / "export_grid.png"
    image_grid(images, rows=rows).save(path)
    return path


# --- model cards ------------------------------------------------------------------------------------------------
def card_metadata(teacher, given: str) -> dict:
    """What a model card's front matter says of the teacher (fastdiff.json's ``card``): ``base_model`` where the
    teacher has a hub id (``teacher_hub_id``: a hub rejects a card whose base_model is not a model on it, so a local
    folder of unknown origin gets none), its license where its folder says (``teacher_license``; otherwise none: the
    student's terms are the teacher's, which fastdiff cannot know), and the ``pipeline_tag``: ``image-to-image`` for
    an image-conditioned teacher (the x4 upscaler), else ``text-to-image``."""
    from .teacher import teacher_hub_id, teacher_license

    hub_id = teacher_hub_id(given, teacher.path)
    return {
        **({"base_model": hub_id} if hub_id else {}),
        **teacher_license(teacher.path),
        "pipeline_tag": "image-to-image" if teacher.image_conditioned else "text-to-image",
    }


def card_front_matter(recipe: dict, tags=()) -> str:
    """The YAML front matter of every fastdiff model card: ``library_name: diffusers``, fastdiff.json's ``card``
    (``base_model``, ``license``, ``pipeline_tag``) and the tags ``fastdiff``, the method, ``distillation``, ``tags``
    and ``lora`` when the export has a LoRA."""
    import yaml

    card = recipe.get("card") or {"pipeline_tag": "text-to-image"}
    lora = ["lora"] if recipe.get("lora") or recipe.get("lora_base") else []
    meta = {
        "library_name": "diffusers",
        **card,
        "tags": list(dict.fromkeys(["fastdiff", recipe["method"], "distillation", *tags, *lora])),
    }
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n"


def pipeline_ref(recipe: dict) -> str:
    """The exported pipeline's folder as a card's code names it (from the export folder): ``"pipeline"``, or in
    the hub layout ``"."`` (the folder itself, or its repo id once uploaded)."""
    return '"."' if recipe.get("layout") == "hub" else f'"{PIPELINE_FOLDER}"'


def pipeline_file_prefix(recipe: dict) -> str:
    """Where the exported pipeline's files sit in the export, as a prefix: ``pipeline/``, or nothing (hub layout)."""
    return "" if recipe.get("layout") == "hub" else f"{PIPELINE_FOLDER}/"


def lora_ref(recipe: dict, folder: str = "lora") -> str:
    """``load_lora_weights``' arguments for a LoRA folder of the export: ``"lora"``, or in the hub layout
    ``".", subfolder="lora"`` (which also works with the repo id in place of ``"."``)."""
    return f'".", subfolder="{folder}"' if recipe.get("layout") == "hub" else f'"{folder}"'


def teacher_ref(recipe: dict) -> str:
    """The teacher as a card's code loads it: its hub id where known, else the folder as given."""
    return (recipe.get("card") or {}).get("base_model") or recipe["teacher"]


def lora_base_note(recipe: dict, fused: bool = True) -> str:
    """The card's sentence on which base every LoRA of the export goes on; ``fused``: the exported pipeline has the
    student's LoRA fused in (say that loading a LoRA on it applies it twice)."""
    base = recipe.get("lora_base") or {}
    fingerprint = f" (UNet fingerprint `{base['unet_fingerprint']}`)" if base.get("unet_fingerprint") else ""
    pipeline = "the exported pipeline" + ("" if recipe.get("layout") == "hub" else f" (`{PIPELINE_FOLDER}/`)")
    never = (
        f", never on {pipeline}, which has the student fused in already (it would apply twice)"
        if fused
        else ""
    )
    return (
        f"Every LoRA here goes on the teacher `{recipe['teacher']}`{fingerprint}{never}. `fastdiff.json`'s "
        "`lora_base` and each LoRA folder's `fastdiff_lora.json` record that base; "
        "`fastdiff.models.lora.check_lora_base` checks a pipeline's UNet against it."
    )


def model_card(recipe: dict, grid: str) -> str:
    steps, cls = recipe["num_inference_steps"], recipe["pipeline_class"]
    ts = "" if recipe["timesteps_derivable"] else f", timesteps={recipe['timesteps']}"
    where, teacher = pipeline_ref(recipe), teacher_ref(recipe)
    lora = ""
    if recipe["lora"]:
        lora = f"""
## As a LoRA on the teacher

{lora_base_note(recipe)}

```python
import torch
from diffusers import {cls}, {recipe["scheduler"]}

pipe = {cls}.from_pretrained("{teacher}")  # the teacher, not this export's pipeline
pipe.load_lora_weights({lora_ref(recipe)})  # or weight_name="kohya_lora.safetensors" (kohya / ComfyUI keys)
pipe.fuse_lora(lora_scale={recipe["lora_scale"]})
pipe.scheduler = {recipe["scheduler"]}.from_pretrained({where}, subfolder="scheduler")
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

pipe = {cls}.from_pretrained("{teacher}")  # the teacher
pipe.load_lora_weights({lora_ref(recipe, r["lora"])})
pipe.fuse_lora(lora_scale={recipe["lora_scale"]})
pipe.scheduler = {r["scheduler"]}.from_config(pipe.scheduler.config, **{r["scheduler_kwargs"]})
image = pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=0.0).images[0]
```
"""
    note = ""
    if not recipe["timesteps_derivable"]:
        note = f"\n**Note:** the trained timesteps {recipe['timesteps']} cannot be derived by a scheduler config: pass them.\n"
    return f"""{card_front_matter(recipe)}# {recipe["method"].upper()} {steps}-step student of `{recipe["teacher"]}`

Distilled with fastdiff {recipe["fastdiff_version"]} ({recipe["method"]}). Trained timesteps: {recipe["timesteps"]}
(scheduler: {recipe["scheduler"]}, derived from `num_inference_steps` alone: {recipe["timesteps_derivable"]}).
{note}
## Standard pipeline

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({where}){"  # the student's LoRA is fused in" if recipe["lora"] else ""}
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0.0{ts}).images[0]
```

or `fastdiff generate . "a photo of a cat"`, which reads these arguments from `fastdiff.json`.
{lora}
## Samples

![samples]({grid})
"""
