"""``fastdiff bench quality``: every system meets the teacher on the same work.

For a digits teacher and a list of systems (the teacher at given steps/CFG, fastdiff exports), sample N images per
system with fixed seeds and prompts balanced over the 10 digits, then score them against the held-out digits:
FD-digits, prompt accuracy, coverage, diversity, plus NFE (UNet calls per image) and end-to-end latency. Writes
``bench.json`` (a list of rows), ``bench.md`` (a table) and one sample grid per row. ``--gmm`` runs the same rows on
the analytic Gaussian-mixture teacher with exact metrics (NLL, mode coverage, sliced W2).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..digits.data import balanced_prompts
from ..export import image_grid
from ..recipe import Recipe, read_recipe, step_sources

TEACHER_STEPS = (1, 2, 4, 8, 25)


@dataclass
class System:
    """One row: a pipeline folder and how to call it."""

    name: str
    method: str
    pipeline: str
    steps: int
    guidance_scale: float
    # "ddim" (trailing), {"class": name, **config}, or None (the folder's own)
    scheduler: str | dict | None = None
    extra: dict | None = None
    train_seconds: float | None = None
    lora: str | None = None  # a LoRA folder loaded on top (e.g. a student LoRA under AGD's adapters)
    lora_scale: float | None = None  # set: the LoRA is fused at this scale (an export's per-step LoRA)


def teacher_systems(teacher: str, guidance_scale: float, steps=TEACHER_STEPS) -> list[System]:
    return [System(f"teacher-{s}", "teacher", teacher, s, guidance_scale, scheduler="ddim") for s in steps]


def export_system(
    folder: str, name: str | None = None, steps: int | None = None, guidance_scale: float | None = None
) -> System:
    """A row for a fastdiff export: its recipe at ``steps`` (default: its own count; ``Recipe.for_steps`` decides
    what a count means), at ``guidance_scale`` where given (AGD exports take any w)."""
    data = read_recipe(folder)
    recipe = Recipe.from_json(data)
    step = recipe.for_steps(steps or recipe.num_inference_steps)  # a count's own recipe where it has one
    pipeline, lora = step_sources(folder, step, data)  # pipeline/, or the teacher and the count's own LoRA
    kw = step.call_kwargs()
    n, g = kw.pop("num_inference_steps"), kw.pop("guidance_scale")
    return System(
        name or f"{data['method']}-{n}",
        data["method"],
        str(pipeline),
        n,
        g if guidance_scale is None else guidance_scale,
        scheduler={"class": step.scheduler, **step.scheduler_kwargs} if step.scheduler else None,
        extra=kw,
        train_seconds=data.get("train_seconds"),
        lora=None if lora is None else str(lora),
        lora_scale=None if lora is None else data.get("lora_scale") or 1.0,
    )


def stacked_system(agd_export: str, student_export: str, steps: int, guidance_scale: float) -> System:
    """AGD's adapters guiding a step-distilled student LoRA: the student's LoRA for that step count (its own, or the
    export's main one) and per-step sampler (scheduler, steps, eta) under the AGD pipeline at guidance ``w`` (one
    UNet call per step)."""
    student = export_system(student_export, steps=steps)
    recipe, guide = read_recipe(student_export), read_recipe(agd_export)
    if not recipe.get("lora"):
        raise ValueError(f"{student_export} has no LoRA to stack under AGD's adapters (a full-weight export)")
    if guide.get("nfe_per_step") != 1:
        raise ValueError(f"{agd_export} is not a guidance-adapter export (one UNet call per step)")
    # the student's own scheduler (class and config, e.g. set_alpha_to_one), then its per-step options on top
    saved = Path(student_export) / "pipeline" / "scheduler" / "scheduler_config.json"
    config = json.loads(saved.read_text()) if saved.is_file() else {"_class_name": recipe["scheduler"]}
    scheduler = {"class": config["_class_name"], **{k: v for k, v in config.items() if not k.startswith("_")}}
    scheduler.update(student.scheduler or {})
    return System(
        f"{guide['method']}+{Path(student_export).name}-{steps}-w{guidance_scale:g}",
        f"{guide['method']}+{recipe['method']}",
        str(Path(agd_export) / "pipeline"),
        steps,
        guidance_scale,
        scheduler=scheduler,
        extra=student.extra,
        lora=student.lora or str(Path(student_export) / recipe["lora"]),
    )


def _load(system: System):
    from diffusers import DDIMScheduler

    from ..recipe import load_lora_pipeline, load_pipeline, make_scheduler

    # a standard pipeline, or a custom one (AGD's adapter guidance) through fastdiff's own class
    if system.lora and system.lora_scale is not None:
        pipe = load_lora_pipeline(system.pipeline, system.lora, system.lora_scale, use_safetensors=True)
    else:
        pipe = load_pipeline(system.pipeline, use_safetensors=True)
        if system.lora:
            pipe.load_lora_weights(system.lora)
    pipe.set_progress_bar_config(disable=True)
    if system.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
        )
    elif isinstance(system.scheduler, dict):
        options = dict(system.scheduler)
        pipe.scheduler = make_scheduler(pipe.scheduler.config, options.pop("class"), options)
    return pipe


@torch.no_grad()
def sample(
    system: System, n: int, batch: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images [n, 3, H, W] in [0, 1], labels [n], seconds per image end to end)."""
    if n <= 0:
        raise ValueError(f"the number of images per system must be positive, got {n}")
    pipe = _load(system)
    prompts, labels = balanced_prompts(n)
    images, seconds = [], 0.0
    for i in range(0, n, batch):
        gen = torch.Generator().manual_seed(seed + i)
        t0 = time.perf_counter()
        out = pipe(
            prompts[i : i + batch],
            num_inference_steps=system.steps,
            guidance_scale=system.guidance_scale,
            generator=gen,
            output_type="pt",
            **(system.extra or {}),
        ).images
        seconds += time.perf_counter() - t0
        images.append(out.float().cpu())
    return torch.cat(images), torch.tensor(labels), seconds / n


def nfe(system: System) -> int:
    # AGD: guidance without a second UNet call
    cfg = system.guidance_scale > 1 and not system.method.startswith("agd")
    return system.steps * (2 if cfg else 1)


def run(
    systems: list[System], out: str | Path, n: int = 1000, batch: int = 100, classifier=None
) -> list[dict]:
    """Sample, score and write bench.json / bench.md / grids for ``systems``."""
    from .metrics import DigitsEvaluator

    if n <= 0:
        raise ValueError(f"the number of images per system must be positive, got {n}")
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    evaluator = DigitsEvaluator(classifier) if classifier is not None else DigitsEvaluator()
    rows = []
    for system in systems:
        images, labels, sec = sample(system, n, batch)
        scores = evaluator(images, labels)
        order = torch.argsort(labels, stable=True)  # grid: one row per digit
        per_digit = max(1, min(10, n // 10))
        pick = torch.cat([order[labels[order] == d][:per_digit] for d in range(10)])
        image_grid(images[pick], rows=10).save(out / "grids" / f"{system.name}.png")
        row = {
            "system": system.name,
            "method": system.method,
            "steps": system.steps,
            "guidance_scale": system.guidance_scale,
            "nfe": nfe(system),
            "fd_digits": scores["fd_digits"],
            "prompt_accuracy": scores["prompt_accuracy"],
            "coverage": scores["coverage"],
            "diversity": scores["diversity"],
            "latency_ms": sec * 1e3,
            "batch": batch,
            "n": n,
            "train_seconds": system.train_seconds,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, out)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out = Path(out)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    keys = [
        "system",
        "method",
        "steps",
        "nfe",
        "fd_digits",
        "prompt_accuracy",
        "coverage",
        "diversity",
        "latency_ms",
        "train_seconds",
    ]
    extra = [k for k in ("nll", "nll_true", "mode_coverage", "sw2") if any(k in r for r in rows)]
    keys = [k for k in keys if any(k in r for r in rows)] + extra
    (out / "bench.md").write_text(markdown_table(rows, keys))


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    """Rows as a markdown table with the columns ``keys`` (floats to 4 significant digits, missing as –)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
