"""``fastdiff bench quality``: every system meets the teacher on the same work.

For a teacher and a list of systems (the teacher at given steps/CFG, fastdiff exports), sample N images per system
with fixed seeds, then score them. With the digits prompts (the default: balanced over the 10 digits) the scores
are the digits metrics against the held-out digits (``metrics.DigitsEvaluator``): FD-digits, FD-pixels, KID in both
spaces, precision/recall, prompt accuracy, coverage, diversity (``LEGEND``). With a prompt
list (``--prompts``, e.g. COCO captions) the digits metrics are off, as they need digit labels. Either way, from
local model files where given (``reference_metrics``): CLIP score of each image with its prompt (``--clip``), and
FID and KID against a folder of real images (``--inception`` + ``--reference-images``). Every row also has NFE
(UNet calls per image) and end-to-end latency. Writes ``bench.json`` (a list of rows), ``bench.md`` (a table and a
legend of its columns), one sample grid per row (``grids/<system>.png``) and ``grids/side_by_side.png``: the same
prompts and seeds (image i of every system draws the same noise) in one row per system. ``--gmm`` runs the same rows on the analytic Gaussian-mixture teacher with exact metrics
(NLL, mode coverage, sliced W2).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..digits.data import balanced_prompts
from ..export import image_grid
from ..recipe import Recipe, pipeline_dir, read_recipe, step_sources
from .reference_metrics import CLIPScore, InceptionReference

TEACHER_STEPS = (1, 2, 4, 8, 25)
GRID_IMAGES = 16  # images in a system's grid with a prompt list
SIDE_BY_SIDE_PER_DIGIT = 4  # digits prompts per digit in the side-by-side grid (40 prompts)
SIDE_BY_SIDE_PROMPTS = 8  # prompts in the side-by-side grid with a prompt list
SIDE_BY_SIDE = "grids/side_by_side.png"


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
    saved = pipeline_dir(student_export) / "scheduler" / "scheduler_config.json"
    config = json.loads(saved.read_text()) if saved.is_file() else {"_class_name": recipe["scheduler"]}
    scheduler = {"class": config["_class_name"], **{k: v for k, v in config.items() if not k.startswith("_")}}
    scheduler.update(student.scheduler or {})
    return System(
        f"{guide['method']}+{Path(student_export).name}-{steps}-w{guidance_scale:g}",
        f"{guide['method']}+{recipe['method']}",
        str(pipeline_dir(agd_export)),
        steps,
        guidance_scale,
        scheduler=scheduler,
        extra=student.extra,
        lora=student.lora or str(Path(student_export) / recipe["lora"]),
    )


def _load(system: System, device: str | None = None):
    from diffusers import DDIMScheduler

    from ..recipe import check_lora_folder, load_lora_pipeline, load_pipeline, make_scheduler

    # a standard pipeline, or a custom one (AGD's adapter guidance) through fastdiff's own class
    if system.lora and system.lora_scale is not None:
        pipe = load_lora_pipeline(system.pipeline, system.lora, system.lora_scale, use_safetensors=True)
    else:
        pipe = load_pipeline(system.pipeline, use_safetensors=True)
        if system.lora:  # on the pipeline's UNet as it is: the LoRA's recorded base must be that UNet
            check_lora_folder(pipe.unet, system.lora)
            pipe.load_lora_weights(system.lora)
    pipe.set_progress_bar_config(disable=True)
    if device is not None and torch.device(device).type != "cpu":
        pipe.to(device, torch.float16)  # the GPU's usual inference precision
    if system.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
        )
    elif isinstance(system.scheduler, dict):
        options = dict(system.scheduler)
        pipe.scheduler = make_scheduler(pipe.scheduler.config, options.pop("class"), options)
    return pipe


@torch.no_grad()
def sample_batches(system: System, prompts: list[str], batch: int = 100, seed: int = 0, device=None):
    """Yields (images [b, 3, H, W] in [0, 1] on the CPU, seconds end to end) for each batch of ``prompts``; the
    batch starting at prompt i draws its noise from a CPU generator seeded with ``seed + i`` (the same noise on
    any ``device``; a GPU samples in float16)."""
    pipe = _load(system, device)
    for i in range(0, len(prompts), batch):
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
        yield out.float().cpu(), time.perf_counter() - t0


def sample(
    system: System, n: int, batch: int = 100, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images [n, 3, H, W] in [0, 1], labels [n], seconds per image end to end) for the digits prompts."""
    if n <= 0:
        raise ValueError(f"the number of images per system must be positive, got {n}")
    prompts, labels = balanced_prompts(n)
    parts = list(sample_batches(system, prompts, batch, seed))
    return torch.cat([p[0] for p in parts]), torch.tensor(labels), sum(p[1] for p in parts) / n


def nfe(system: System) -> int:
    # AGD: guidance without a second UNet call
    cfg = system.guidance_scale > 1 and not system.method.startswith("agd")
    return system.steps * (2 if cfg else 1)


def sample_and_score(
    system: System,
    prompts: list[str],
    batch: int,
    clip: CLIPScore | None = None,
    inception: InceptionReference | None = None,
    keep: int | None = None,
    device=None,
) -> tuple[torch.Tensor, float, dict]:
    """Sample ``system`` on ``prompts`` and score each batch as it comes: (the first ``keep`` images, all for None;
    seconds per image; ``clip_score`` and/or ``fid``, ``kid_mean``, ``kid_std`` for the metrics given)."""
    kept, clip_scores, features, seconds, done = [], [], [], 0.0, 0
    for images, sec in sample_batches(system, prompts, batch, device=device):
        seconds += sec
        if clip is not None:
            clip_scores.append(clip.scores(images, prompts[done : done + len(images)]))
        if inception is not None:
            features.append(inception.features(images))
        kept.append(images if keep is None else images[: max(0, keep - done)])
        done += len(images)
    scores = {} if clip is None else {"clip_score": float(torch.cat(clip_scores).mean())}
    if inception is not None:
        scores.update(inception.scores(torch.cat(features)))
    return torch.cat(kept), seconds / done, scores


def digits_grid(images: torch.Tensor, labels: torch.Tensor):
    """Up to 10 images per digit, one grid row per digit."""
    order = torch.argsort(labels, stable=True)
    per_digit = max(1, min(10, len(labels) // 10))
    pick = torch.cat([order[labels[order] == d][:per_digit] for d in range(10)])
    return image_grid(images[pick], rows=10)


def side_by_side_indices(labels: torch.Tensor, per_digit: int = SIDE_BY_SIDE_PER_DIGIT) -> torch.Tensor:
    """Indices of the first ``per_digit`` prompts of each digit, digit by digit (fewer where ``labels`` has fewer)."""
    labels = torch.as_tensor(labels)
    return torch.cat([torch.nonzero(labels == d).flatten()[:per_digit] for d in range(10)])


def side_by_side(images: dict[str, torch.Tensor], label_width: int | None = None, min_tile: int = 64):
    """One row per system, one column per prompt: ``images`` maps each system's name to its images [P, 3, H, W] in
    [0, 1] of the same P prompts and seeds. Tiles take the first system's size (others are resized), enlarged by the
    integer factor f = max(1, ``min_tile`` // H) (nearest neighbour: 32x32 digits show at 64x64, pixels intact); the
    system's name is written in a margin of ``label_width`` pixels on the left (default: wide enough for the longest
    name; 0 for none). Tile (row r, column j) lies at x = label_width + j * f * W, y = r * f * H."""
    import numpy as np
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no systems for the side-by-side grid")
    first = next(iter(images.values()))
    p, _, h, w = first.shape
    if any(x.shape[0] != p for x in images.values()):
        raise ValueError(f"every system needs the same prompts: got {[x.shape[0] for x in images.values()]}")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = max(int(draw.textlength(name)) for name in images) + 8
    rows = []
    for x in images.values():
        x = x.float().cpu().clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (h, w):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True).clamp(0, 1)
        rows.append(x)
    f = max(1, min_tile // h)
    if f > 1:
        rows = [x.repeat_interleave(f, -2).repeat_interleave(f, -1) for x in rows]
        h, w = h * f, w * f
    tiles = (torch.cat(rows).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = np.zeros((len(rows) * h, label_width + p * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, p)
        grid[r * h : (r + 1) * h, label_width + c * w : label_width + (c + 1) * w] = tile
    image = Image.fromarray(grid)
    if label_width:  # drawn on the margin alone: a long name is cut, never written over a tile
        margin = Image.new("RGB", (label_width, len(rows) * h))
        draw = ImageDraw.Draw(margin)
        for r, name in enumerate(images):
            draw.text((4, r * h + max(0, h // 2 - 6)), name, fill=(255, 255, 255))
        image.paste(margin, (0, 0))
    return image


def run(
    systems: list[System],
    out: str | Path,
    n: int = 1000,
    batch: int = 100,
    classifier=None,
    prompts: list[str] | None = None,
    clip: CLIPScore | None = None,
    inception: InceptionReference | None = None,
    device=None,
) -> list[dict]:
    """Sample, score and write bench.json / bench.md / grids for ``systems``.

    ``prompts``: None for the digits prompts and metrics, or a list of prompts (repeated in order up to ``n``) and
    no digits metrics; then only a system's first ``GRID_IMAGES`` images are kept, for its grid. The side-by-side
    grid shows the first ``SIDE_BY_SIDE_PER_DIGIT`` prompts of each digit (or the first ``SIDE_BY_SIDE_PROMPTS``
    prompts of the list) for every system. ``clip`` adds the
    column ``clip_score``; ``inception`` adds ``fid``, ``kid_mean`` and ``kid_std``. ``device``: where pipelines
    sample (None: the CPU); the metric models stay where the caller put them.
    """
    from .metrics import DigitsEvaluator

    if n <= 0:
        raise ValueError(f"the number of images per system must be positive, got {n}")
    if inception is not None and n < 2:
        raise ValueError(f"FID/KID need at least 2 images per system, got {n}")
    if prompts is not None and not prompts:
        raise ValueError("the prompt list is empty")
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    digits = prompts is None
    if digits:
        prompts, labels = balanced_prompts(n)
        labels = torch.tensor(labels)
        evaluator = DigitsEvaluator(*([] if classifier is None else [classifier]), all_metrics=True)
    else:
        prompts = [prompts[i % len(prompts)] for i in range(n)]
    shown = (
        side_by_side_indices(labels) if digits else torch.arange(min(SIDE_BY_SIDE_PROMPTS, n, GRID_IMAGES))
    )
    rows, compared = [], {}
    for system in systems:
        keep = None if digits else GRID_IMAGES
        images, seconds, scores = sample_and_score(system, prompts, batch, clip, inception, keep, device)
        row = {
            "system": system.name,
            "method": system.method,
            "steps": system.steps,
            "guidance_scale": system.guidance_scale,
            "nfe": nfe(system),
            **(evaluator(images, labels) if digits else {}),
            "latency_ms": seconds * 1e3,
            "batch": batch,
            "n": n,
            "train_seconds": system.train_seconds,
            **scores,
        }
        grid = digits_grid(images, labels) if digits else image_grid(images, rows=math.isqrt(len(images)))
        grid.save(out / "grids" / f"{system.name}.png")
        compared[system.name] = images[shown]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if compared:
        side_by_side(compared).save(out / SIDE_BY_SIDE)
    write(rows, out, grid=SIDE_BY_SIDE if compared else None)
    return rows


LEGEND = {
    "nfe": "UNet calls per image (CFG counts two).",
    "fd_digits": "Fréchet distance of Gaussians fitted to the bundled digits classifier's 64-d penultimate features,"
    " generated vs the held-out digits (lower is better; biased upwards at small N).",
    "fd_pixels": "the same Fréchet distance on a space independent of the classifier: each image taken back to the"
    " digits' native 8x8 grey pixels in [0, 1] (least-squares inverse of the data's 8 -> 32 bilinear upsampling, so"
    " a held-out digit gives its scikit-learn image exactly); sees stroke texture and blotches the classifier may"
    " ignore.",
    "kid_digits": "KID on the classifier features: unbiased MMD^2 with the kernel (x.y/64 + 1)^3, mean over 100"
    " subsets of min(1000, N, N_ref) images (seed 0; the std over subsets is `kid_digits_std` in bench.json); ~0"
    " (either sign) for samples of the data's distribution, less biased by N than FD.",
    "kid_pixels": "the same KID on the 8x8 pixel features (`kid_pixels_std` in bench.json).",
    "precision": "k-NN precision (Kynkäänniemi et al. 2019, k = 3) on the classifier features: fraction of generated"
    " images inside the held-out digits' manifold (union of balls reaching each real image's 3rd nearest real"
    " neighbour); fidelity, low for off-manifold samples.",
    "recall": "k-NN recall (k = 3): fraction of held-out digits inside the generated images' manifold; variety, low"
    " when modes (e.g. whole digits) are dropped. Both depend on N.",
    "prompt_accuracy": "fraction of images the classifier reads as their prompted digit.",
    "coverage": "per-class mode coverage: weight of each digit's k-means modes (k = 5) hit by its images, averaged"
    " over digits (1 = every mode).",
    "diversity": "within-class mean pairwise feature distance relative to the held-out digits' (1 = real; 0 ="
    " copies).",
    "clip_score": "CLIP score of each image with its prompt (100 x cosine, clamped at 0).",
    "fid": "FID against the reference images (FID Inception-v3 pool features).",
    "kid_mean": "KID against the reference images (Inception features; `kid_std` its std over subsets).",
    "latency_ms": "milliseconds per image end to end (text encoding + UNet + VAE) at the row's batch.",
    "train_seconds": "distillation wall-clock time of the export.",
}


def legend(keys: list[str]) -> str:
    """The markdown legend of the columns ``keys`` that ``LEGEND`` describes ("" for none)."""
    lines = [f"- `{k}`: {LEGEND[k]}" for k in keys if k in LEGEND]
    return "\n".join(["", "Columns:", "", *lines, ""]) if lines else ""


def write(rows: list[dict], out: Path, grid: str | None = None) -> None:
    """bench.json (every key of every row) and bench.md (the table, a legend of its columns and, where given, the
    side-by-side ``grid``'s path relative to ``out``)."""
    out = Path(out)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    keys = [
        "system",
        "method",
        "steps",
        "nfe",
        "fd_digits",
        "fd_pixels",
        "kid_digits",
        "kid_pixels",
        "precision",
        "recall",
        "prompt_accuracy",
        "coverage",
        "diversity",
        "clip_score",
        "fid",
        "kid_mean",
        "kid_std",
        "latency_ms",
        "train_seconds",
    ]
    extra = [k for k in ("nll", "nll_true", "mode_coverage", "sw2") if any(k in r for r in rows)]
    keys = [k for k in keys if any(k in r for r in rows)] + extra
    text = markdown_table(rows, keys) + legend(keys)
    if grid is not None:
        text += f"\nSide by side (same prompts and seeds, one row per system): ![side by side]({grid})\n"
    (out / "bench.md").write_text(text)


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
