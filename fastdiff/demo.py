"""``fastdiff demo``: distil the bundled digits teacher, export it, and benchmark student against teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .paths import asset

DIGITS_TEACHER = asset("teachers", "digits-sdxl")

logger = logging.getLogger("fastdiff")


def teacher_guidance(teacher: Path = DIGITS_TEACHER) -> float:
    """The teacher's recommended CFG scale (written by train/teacher.py next to the pipeline)."""
    meta = Path(teacher) / "fastdiff_teacher.json"
    return float(json.loads(meta.read_text())["guidance_scale"]) if meta.is_file() else 1.5


def bundled_files(recipe: Path) -> list[str]:
    """Overrides that point a digits recipe's top-level ``assets/...`` paths (teacher, prompts) at this install's
    assets, so the recipe runs from any directory."""
    import yaml

    keys = yaml.safe_load(recipe.read_text())
    return [f"{k}={asset(*v.split('/')[1:])}" for k, v in keys.items() if str(v).startswith("assets/")]


def demo(
    output_dir: str | Path, method: str = "dmd2", n: int = 500, overrides: list[str] | None = None
) -> list[dict]:
    """Distil the bundled teacher with ``assets/configs/digits_<method>.yaml``, export, sample, benchmark."""
    from .config import load_config
    from .eval import bench_quality
    from .run import train
    from .teacher import check_pipeline_folder

    out = Path(output_dir)
    recipe = asset("configs", f"digits_{method}.yaml")
    if not recipe.is_file():
        available = sorted(p.stem.removeprefix("digits_") for p in asset("configs").glob("digits_*.yaml"))
        raise ValueError(f"no digits recipe for method {method!r}; available: {', '.join(available)}")
    check_pipeline_folder(DIGITS_TEACHER)
    cfg = load_config(
        recipe, [*bundled_files(recipe), f"teacher={DIGITS_TEACHER}", f"output_dir={out}", *(overrides or [])]
    )
    train(cfg)
    w = teacher_guidance()
    systems = [
        *bench_quality.teacher_systems(str(DIGITS_TEACHER), w, steps=(25, 1)),
        bench_quality.export_system(str(out)),
    ]
    rows = bench_quality.run(systems, out / "bench", n=n)
    print((out / "bench" / "bench.md").read_text())
    print(f"student pipeline: {out / 'pipeline'}   samples: {out / 'bench' / 'grids'}")
    return rows
