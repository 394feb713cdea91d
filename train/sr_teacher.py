"""Train the bundled SR teacher: ``python train/sr_teacher.py --config assets/configs/teacher_sr.yaml``.

Usage: ``python train/sr_teacher.py --config RECIPE.yaml [key=value ...] [--out DIR] [--resume]``
(default ``--out assets/teachers/sr-x4``). See ``fastdiff.sr.teacher``.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch loads OpenMP: spin-waiting OpenMP threads are far slower on shared cores (see train/teacher.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastdiff.sr.teacher import load_teacher_config, train_teacher  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="assets/configs/teacher_sr.yaml")
    parser.add_argument("--out", default="assets/teachers/sr-x4")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/_train_state")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. unet.steps=300")
    args = parser.parse_args(argv)
    cfg = load_teacher_config(args.config, args.overrides)
    train_teacher(cfg, args.out, resume=args.resume)


if __name__ == "__main__":
    main()
