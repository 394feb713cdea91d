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
    else:
        raise ValueError(f"unknown benchmark {args.kind!r}")


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

    p = sub.add_parser("bench", help="benchmarks: speed")
    p.add_argument("kind", choices=["speed"])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--iters", type=int, default=5)
    p.set_defaults(fn=_bench)

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
