"""Train the bundled digits teacher: ``python train/teacher.py --config assets/configs/teacher_digits.yaml``.

Usage: ``python train/teacher.py --config RECIPE.yaml [key=value ...] [--out DIR] [--resume]``
(default ``--out assets/teachers/digits-sdxl``). See ``fastdiff.digits.teacher``.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads OpenMP: on shared cores, OpenMP's default spin-waiting made 2 threads ~30x slower per step
# (8 s vs 0.25 s) whenever another process held a core; PASSIVE waiting kept 2 threads at 0.7 s there.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402


def main(
    argv=None,
    module: str = "fastdiff.digits.teacher",
    config: str = "assets/configs/teacher_digits.yaml",
    out: str = "assets/teachers/digits-sdxl",
    description: str = __doc__.splitlines()[0],
):
    """Parse the command line and train with ``module``'s ``load_teacher_config`` / ``train_teacher``."""
    trainer = importlib.import_module(module)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=config)
    parser.add_argument("--out", default=out)
    parser.add_argument("--resume", action="store_true", help="continue from DIR/_train_state")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=300")
    args = parser.parse_args(argv)
    cfg = trainer.load_teacher_config(args.config, args.overrides)
    trainer.train_teacher(cfg, args.out, resume=args.resume)


if __name__ == "__main__":
    main()
