"""``fastdiff train | export | generate | upscale | bench | demo | serve | prepare | agd-trajectories | tiny``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .paths import asset

# the --print-config flag of `fastdiff train`, as train/distill.py's (fastdiff.run.train_parser) says it
PRINT_CONFIG_HELP = (
    "print every config key (shared and the method's section) with its value after the recipe and overrides, its "
    "default and its meaning, then exit without training"
)


def _train(args) -> None:
    from .run import main

    config = ["--config", args.config] if args.config else []
    main(config + (["--print-config"] if args.print_config else []) + args.overrides)


def _export(args) -> None:
    from .run import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, teacher=args.teacher, hub_layout=args.hub_layout)
    print(f"exported to {out}")


def _generate(args) -> None:
    import torch

    from .recipe import Recipe, apply_scheduler, load_step_pipeline, read_recipe

    folder = Path(args.export_dir)
    data = read_recipe(folder)
    if data.get("pipeline_class") == "StableDiffusionUpscalePipeline":
        raise ValueError(f"{folder} is an upscaler export: run `fastdiff upscale {folder} IMAGE --out FILE`")
    recipe = Recipe.from_json(data)
    step = recipe.for_steps(args.steps)  # the export's rule for the step counts it runs at
    warning = recipe.cfg_warning(args.guidance_scale)
    if warning:
        print(f"fastdiff: warning: {warning}", file=sys.stderr)
    pipe = load_step_pipeline(folder, step, data, use_safetensors=True)  # pipeline/, or teacher + step's LoRA
    apply_scheduler(pipe, step)
    kwargs = step.call_kwargs()
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
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


def _upscale(args) -> None:
    from .sr.upscale import upscale_file

    print(upscale_file(args.export_dir, args.image, args.out, seed=args.seed, tile=args.tile))


def _bench(args) -> None:
    if args.kind == "sr":
        from .eval.bench_sr import run as run_sr

        if not args.export:
            raise SystemExit("bench sr needs --export DIR (an upscaler export)")
        run_sr(
            args.export[0],
            args.out or "bench-sr",
            teacher_steps=[int(s) for s in args.sr_teacher_steps.split(",")],
        )
        return
    if args.kind == "serve":
        from .eval.bench_serve import run as run_serve

        run_serve(args.out or "bench-serve", duration=args.duration)
        return
    if args.kind == "soak":
        from .eval.bench_soak import run as run_soak

        result = run_soak(args.out or "assets/bench/soak", requests=args.requests, clients=args.clients)
        if not result["passed"]:
            raise SystemExit("bench soak: some answers broke the invariants (see bench.md)")
        return
    if args.kind == "scale":
        from .eval.bench_scale import run as run_scale

        rows = run_scale(
            args.out or "bench-scale",
            tiny=args.tiny,
            iters=args.iters,
            batches=[int(b) for b in args.batches.split(",")],
            modes=args.modes.split(","),
            families=args.families.split(","),
        )
        print(f"{len(rows)} rows written to {args.out or 'bench-scale'}/scale.json and scale.md")
        return
    if args.kind == "speed":
        from .eval.bench_speed import run

        run(args.out, iters=args.iters)
        return
    from .demo import DIGITS_TEACHER, teacher_guidance
    from .eval import bench_quality

    if args.gmm:
        from .eval.bench_gmm import run as run_gmm

        run_gmm(args.out or "bench-gmm", n=args.n, methods=args.gmm_methods.split(","))
        return
    teacher = args.teacher or str(DIGITS_TEACHER)
    given = [float(x) for x in args.guidance_scale.split(",")] if args.guidance_scale else []
    steps = [int(s) for s in args.teacher_steps.split(",") if s]
    systems = []
    for w in given or [teacher_guidance(Path(teacher))]:
        rows = bench_quality.teacher_systems(teacher, w, steps)
        for r in rows if len(given) > 1 else []:  # several scales: name the rows by w
            r.name += f"-w{w:g}"
        systems += rows
    counts = [int(x) for x in args.export_steps.split(",")] if args.export_steps else [None]
    scales = [float(x) for x in args.export_guidance.split(",")] if args.export_guidance else [None]
    for e in args.export:  # every export at each step count and guidance scale, rows named by folder
        for k in counts:
            for g in scales:
                suffix = (f"-{k}" if k else "") + (f"-w{g:g}" if g is not None else "")
                name = Path(e).name + suffix if suffix else None  # None: the export's own name
                systems.append(bench_quality.export_system(e, name=name, steps=k, guidance_scale=g))
    for k in counts if args.stack else []:
        for g in scales:
            if k is None or g is None:
                raise SystemExit("--stack needs --export-steps and --export-guidance")
            systems.append(bench_quality.stacked_system(*args.stack, steps=k, guidance_scale=g))
    from .data import load_prompts
    from .eval.fid_inception import load_fid_inception
    from .eval.reference_metrics import CLIPScore, InceptionReference

    if bool(args.inception) != bool(args.reference_images):
        raise SystemExit("fastdiff: error: FID/KID need both --inception FILE and --reference-images DIR")

    def load(option: str, path: str | None, read):  # each option's file, read before any sampling
        try:
            return read(path) if path else None
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"fastdiff: error: {option}: {e}") from None

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load("--prompts", args.prompts, load_prompts)
    clip = load("--clip", args.clip, CLIPScore.load)
    network = load("--inception", args.inception, load_fid_inception)
    for model in (clip.model if clip else None, network):
        if model is not None:
            model.to(device)
    inception = load(
        "--reference-images", args.reference_images, lambda d: InceptionReference.from_folder(network, d)
    )
    bench_quality.run(
        systems,
        args.out or "bench",
        n=args.n,
        batch=args.batch,
        prompts=prompts,
        clip=clip,
        inception=inception,
        device=device,
    )


def _demo(args) -> None:
    import torch

    from .demo import demo

    overrides = list(args.overrides)
    if args.threads:  # the bench too; training follows the recipe's cpu_threads, so override that as well
        torch.set_num_threads(args.threads)
        overrides.insert(0, f"cpu_threads={args.threads}")
    demo(args.output_dir, method=args.method, n=args.n, overrides=overrides)


def _serve(args) -> None:
    from .serve.app import ExposureError, ServeConfig, serve

    fields = ServeConfig.__dataclass_fields__
    try:
        serve(ServeConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    except ExposureError as e:
        print(f"fastdiff: error: {e}", file=sys.stderr)
        sys.exit(2)


def _prepare(args) -> None:
    from .config import load_config
    from .run import prepare

    result = prepare(load_config(args.config, [*args.defaults, *args.overrides]))
    print(result if result is not None else "this method has no stage before training")


def _cache(args) -> None:
    """``fastdiff cache``: under ``accelerate launch`` each rank makes its shards (``cache.write_cache``)."""
    from accelerate import Accelerator

    from .cache import write_cache
    from .config import load_config
    from .logs import setup_logging
    from .run import WEIGHT_DTYPES, run_context
    from .teacher import Teacher

    cfg = load_config(args.config, args.overrides)
    accelerator = Accelerator()  # the ranks and this rank's device, as training reads them
    setup_logging(accelerator.is_main_process)
    teacher = Teacher(cfg.teacher, device=accelerator.device, dtype=WEIGHT_DTYPES[cfg.mixed_precision])
    report = write_cache(args.out, run_context(cfg, teacher, accelerator), args.shard_size)
    if accelerator.is_main_process:
        made, kept = len(report["generated"]), len(report["skipped"])
        print(f"cache in {args.out}: complete ({made} shards made here, {kept} kept)")


def _tiny(args) -> None:
    from .models.tiny import save_tiny

    print(save_tiny(args.family, args.out, prediction_type=args.prediction_type, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff", description="Distil diffusion models into 1-4 step generators."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="distil a teacher (same code as train/distill.py)")
    p.add_argument("--config", help="recipe YAML")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=_train)

    p = sub.add_parser("export", help="export a checkpoint as pipeline/ + lora/ + fastdiff.json")
    p.add_argument("--checkpoint", required=True, help="checkpoints/checkpoint-N folder")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--teacher", help="override the teacher folder recorded in the checkpoint")
    p.add_argument(
        "--hub-layout",
        action="store_true",
        help="write the pipeline at the export's root (model_index.json, components, README.md, fastdiff.json, "
        "lora/ alongside): a folder DiffusionPipeline.from_pretrained loads and a model hub takes as a repo "
        "(default: in pipeline/)",
    )
    p.set_defaults(fn=_export)

    p = sub.add_parser("generate", help="sample an export with its recorded recipe")
    p.add_argument("export_dir", help="a fastdiff export folder (with fastdiff.json)")
    p.add_argument("prompt")
    p.add_argument(
        "--out",
        default="sample.png",
        help="image file (default: sample.png); several images: NAME-0.png, ...",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--num-images", type=int, default=1, help="images of the prompt (default: 1)")
    p.add_argument("--steps", type=int, help="override the recorded step count")
    p.add_argument("--guidance-scale", type=float, help="override the recorded guidance scale (AGD: any w)")
    p.add_argument("--negative-prompt", help="negative prompt (AGD exports: it conditions the adapters)")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("upscale", help="upscale an image with an upscaler export (e.g. TAD-SR's)")
    p.add_argument("export_dir", help="a fastdiff upscaler export folder (with fastdiff.json)")
    p.add_argument("image", help="input image (any size; grey and RGBA are converted)")
    p.add_argument("--out", required=True, help="output image file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=128, help="input tile side; larger images are tiled")
    p.set_defaults(fn=_upscale)

    p = sub.add_parser("bench", help="benchmarks: speed | quality | serve | scale | sr | soak")
    p.add_argument("kind", choices=["speed", "quality", "serve", "scale", "sr", "soak"])
    p.add_argument("--out", help="speed: a JSON file; quality: a folder (bench.json, bench.md, grids/)")
    p.add_argument("--iters", type=int, default=5, help="speed / scale: timed iterations")
    p.add_argument(
        "--tiny", action="store_true", help="scale: tiny UNets on CPU (the code path, not a measurement)"
    )
    p.add_argument("--batches", default="1,2,4", help="scale: comma list of batch sizes")
    p.add_argument("--modes", default="shared-base,full-copy,fsdp", help="scale: comma list of modes")
    p.add_argument("--families", default="sdxl,sd15", help="scale: comma list of UNet families")
    p.add_argument("--duration", type=float, default=9.0, help="serve: seconds of load per table cell")
    p.add_argument(
        "--requests", type=int, default=500, help="soak: requests under load, 10%% of them hostile"
    )
    p.add_argument("--clients", type=int, default=8, help="soak: concurrent clients")
    p.add_argument("--teacher", help="quality: teacher pipeline folder (default: the bundled digits teacher)")
    p.add_argument(
        "--guidance-scale",
        help="quality: the teacher's CFG, or a comma list of scales (default: its recommended)",
    )
    p.add_argument("--teacher-steps", default="1,2,4,8,25", help="quality: teacher rows (DDIM, trailing)")
    p.add_argument(
        "--sr-teacher-steps", default="1,4,20,50", help="sr: the teacher's rows (its own scheduler)"
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        help="quality: a fastdiff export folder (repeatable); sr: the upscaler export",
    )
    p.add_argument(
        "--export-steps",
        help="quality: comma list of step counts to run each export at (default: its recipe's)",
    )
    p.add_argument(
        "--export-guidance",
        help="quality: comma list of guidance scales to run each export at (AGD exports take any w)",
    )
    p.add_argument(
        "--stack",
        nargs=2,
        metavar=("AGD_EXPORT", "STUDENT_EXPORT"),
        help="quality: AGD's adapters on a step-distilled student LoRA, at each --export-steps x --export-guidance",
    )
    p.add_argument("--n", type=int, default=1000, help="quality: images per system")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="quality: prompts (.txt one per line, e.g. COCO captions, or .jsonl), repeated up to --n; replaces "
        "the digits prompts and drops the digits metrics",
    )
    p.add_argument(
        "--clip",
        metavar="DIR",
        help="quality: a local CLIP model folder (transformers, safetensors) for a clip_score column",
    )
    p.add_argument(
        "--inception",
        metavar="FILE",
        help="quality: FID Inception-v3 weights (pt_inception-2015-12-05 state dict: .safetensors, or .pth read "
        "with weights_only) for fid / kid_mean / kid_std columns; needs --reference-images",
    )
    p.add_argument("--reference-images", metavar="DIR", help="quality: a folder of real images for FID/KID")
    p.add_argument(
        "--device",
        help="quality: where pipelines (float16 on a GPU) and metric models run (default: cuda if any)",
    )
    p.add_argument("--batch", type=int, default=100)
    p.add_argument(
        "--gmm", action="store_true", help="quality: the analytic Gaussian-mixture teacher instead"
    )
    p.add_argument("--gmm-methods", default="dmd2,sid", help="quality --gmm: students to train (dmd2, sid)")
    p.set_defaults(fn=_bench)

    p = sub.add_parser("demo", help="distil the bundled digits teacher, export, sample and benchmark")
    p.add_argument("--output-dir", default="demo")
    methods = sorted(f.stem.removeprefix("digits_") for f in asset("configs").glob("digits_*.yaml"))
    p.add_argument(
        "--method",
        default="dmd2",
        choices=methods,
        help="the method of the digits recipe (assets/configs/digits_<method>.yaml) to run (default: dmd2)",
    )
    p.add_argument("--n", type=int, default=500, help="images per system in the benchmark")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, all cores)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("serve", help="serve a base pipeline with LoRA adapters over HTTP (extra: serve)")
    p.add_argument("--base", required=True, help="local diffusers pipeline folder (SD1.5 / SDXL)")
    p.add_argument("--adapters", required=True, help="folder of *.safetensors LoRAs and fastdiff exports")
    p.add_argument("--host", default="127.0.0.1", help="a non-loopback host needs --token or --insecure")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="bearer token for all but /healthz (or $FASTDIFF_SERVE_TOKEN)")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without a token (anyone who can connect may use the server)",
    )
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda")
    p.add_argument("--cache-size", type=int, help="adapters kept loaded, LRU (default 8)")
    p.add_argument("--max-batch-images", type=int, help="images per batch; 1: no batching (default 8)")
    p.add_argument("--batch-window-ms", type=float, help="batch wait for requests (default 10)")
    p.add_argument(
        "--no-mix-adapters",
        dest="mix_adapters",
        action="store_false",
        default=None,
        help="batch only requests with the same adapters and weights (default: requests with any adapters share a batch, one UNet call)",
    )
    p.add_argument("--max-queue", type=int, help="requests waiting before 503 (default 64)")
    p.add_argument("--default-steps", type=int, help="steps without a fastdiff export adapter (default 25)")
    p.add_argument("--default-guidance-scale", type=float, help="CFG without an export adapter (default 5)")
    p.add_argument("--max-steps", type=int, help="limit (default 50)")
    p.add_argument("--max-n", type=int, help="limit on images per request (default 4)")
    p.add_argument("--max-size", type=int, help="limit on each side in pixels (default 1024)")
    p.add_argument("--max-prompt-chars", type=int, help="limit (default 2000)")
    p.add_argument("--max-body-bytes", type=int, help="limit on a request body (default 1 MiB)")
    p.add_argument("--max-adapter-bytes", type=int, help="limit on an adapter file (default 2 GiB)")
    p.add_argument(
        "--generation-timeout-s", type=float, help="504 for a request not done by then (default 300)"
    )
    p.add_argument(
        "--header-timeout-s", type=float, help="close a connection not sending its request head (default 10)"
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=_serve)

    for name, defaults, text in (
        ("prepare", [], "run the method's stage before training on its own (resumable; train runs it too)"),
        (
            "agd-trajectories",
            ["method=agd"],
            "AGD's stage: sample the teacher's CFG trajectories into shards",
        ),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="recipe YAML (e.g. assets/configs/sdxl_agd.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value overrides (agd.trajectories=<folder>, ...)")
        p.set_defaults(fn=_prepare, defaults=defaults)

    p = sub.add_parser(
        "cache", help="encode the training prompts (and dataset images) once, for training with cache=DIR"
    )
    p.add_argument("--config", help="the recipe YAML of the runs that will read the cache")
    p.add_argument("overrides", nargs="*", help="key=value overrides (teacher=, prompts=, dataset=, ...)")
    p.add_argument("--out", required=True, help="the cache folder (resumable: run again to finish it)")
    p.add_argument("--shard-size", type=int, default=256, help="items per shard (default: 256)")
    p.set_defaults(fn=_cache)

    p = sub.add_parser("tiny", help="write a tiny random-init pipeline (offline tests, examples)")
    p.add_argument("--family", choices=["sd15", "sdxl", "sd-x4"], default="sdxl")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="default: the real checkpoint's (epsilon for sd15/sdxl, v_prediction for sd-x4)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_tiny)
    parser.description += f" Commands: {', '.join(sub.choices)} (fastdiff COMMAND --help for each)."
    return parser


def main(argv=None) -> None:
    from .logs import quiet_libraries

    args = build_parser().parse_args(argv)
    try:
        with quiet_libraries():  # no library progress bars or notices that ask nothing of the user
            args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        from .config import ConfigError
        from .teacher import TeacherError

        if isinstance(e, (ConfigError, TeacherError, FileNotFoundError)) or args.command in (
            "generate",
            "upscale",
        ):
            print(f"fastdiff: error: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
