"""``fastdiff train | export | generate | tiny``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args) -> None:
    from .run import main

    main((["--config", args.config] if args.config else []) + args.overrides)


def _export(args) -> None:
    from .run import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, teacher=args.teacher)
    print(f"exported to {out}")


def _generate(args) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from .export import pipeline_kwargs, read_recipe

    folder = Path(args.export_dir)
    recipe = read_recipe(folder)
    pipe = DiffusionPipeline.from_pretrained(folder / "pipeline", use_safetensors=True)
    kwargs = pipeline_kwargs(recipe)
    if args.steps is not None and args.steps != recipe["num_inference_steps"]:
        if recipe["scheduler"] != "LCMScheduler" or not recipe.get("timesteps_derivable", True):
            raise ValueError(
                f"this export was trained for {recipe['num_inference_steps']} step(s) at timesteps {recipe['timesteps']}; "
                "--steps can change the step count only of LCM-scheduled exports"
            )
        kwargs["num_inference_steps"] = args.steps
    images = pipe(
        args.prompt,
        **kwargs,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        img.save(path)
        print(path)


def _bench(args) -> None:
    if args.kind == "speed":
        from .eval.bench_speed import run

        run(args.out, iters=args.iters)
        return
    from .demo import DIGITS_TEACHER, teacher_guidance
    from .eval import bench_quality

    if args.gmm:
        from .eval.bench_gmm import run as run_gmm

        run_gmm(args.out or "bench-gmm", n=args.n)
        return
    teacher = args.teacher or str(DIGITS_TEACHER)
    w = args.guidance_scale if args.guidance_scale is not None else teacher_guidance(Path(teacher))
    steps = [int(s) for s in args.teacher_steps.split(",") if s]
    systems = bench_quality.teacher_systems(teacher, w, steps)
    systems += [bench_quality.export_system(e) for e in args.export]
    bench_quality.run(systems, args.out or "bench", n=args.n, batch=args.batch)


def _demo(args) -> None:
    from .demo import demo

    demo(args.output_dir, method=args.method, n=args.n, overrides=args.overrides)


def _tiny(args) -> None:
    from .models.tiny import save_tiny

    print(save_tiny(args.family, args.out, prediction_type=args.prediction_type, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff", description="Distil diffusion models into 1-4 step generators."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distil a teacher (same code as train/distill.py)")
    p.add_argument("--config", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=_train)

    p = sub.add_parser("export", help="export a checkpoint as pipeline/ + lora/ + fastdiff.json")
    p.add_argument("--checkpoint", required=True, help="checkpoints/checkpoint-N folder")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--teacher", help="override the teacher folder recorded in the checkpoint")
    p.set_defaults(fn=_export)

    p = sub.add_parser("generate", help="sample an export with its recorded recipe")
    p.add_argument("export_dir", help="a fastdiff export folder (with fastdiff.json)")
    p.add_argument("prompt")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, help="override the recorded step count")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("bench", help="benchmarks: speed | quality")
    p.add_argument("kind", choices=["speed", "quality"])
    p.add_argument("--out", help="speed: a JSON file; quality: a folder (bench.json, bench.md, grids/)")
    p.add_argument("--iters", type=int, default=5, help="speed: timed iterations")
    p.add_argument("--teacher", help="quality: teacher pipeline folder (default: the bundled digits teacher)")
    p.add_argument(
        "--guidance-scale", type=float, help="quality: the teacher's CFG (default: its recommended)"
    )
    p.add_argument("--teacher-steps", default="1,2,4,8,25", help="quality: teacher rows (DDIM, trailing)")
    p.add_argument(
        "--export", action="append", default=[], help="quality: a fastdiff export folder (repeatable)"
    )
    p.add_argument("--n", type=int, default=1000, help="quality: images per system")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument(
        "--gmm", action="store_true", help="quality: the analytic Gaussian-mixture teacher instead"
    )
    p.set_defaults(fn=_bench)

    p = sub.add_parser("demo", help="distil the bundled digits teacher, export, sample and benchmark")
    p.add_argument("--output-dir", default="demo")
    p.add_argument("--method", default="dmd2")
    p.add_argument("--n", type=int, default=500, help="images per system in the benchmark")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("tiny", help="write a tiny random-init pipeline (offline tests, examples)")
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sdxl")
    p.add_argument("--out", required=True)
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_tiny)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        from .config import ConfigError
        from .teacher import TeacherError

        if isinstance(e, (ConfigError, TeacherError, FileNotFoundError)) or args.command == "generate":
            print(f"fastdiff: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
