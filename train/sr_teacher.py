"""Train the bundled SR teacher: ``python train/sr_teacher.py --config assets/configs/teacher_sr.yaml``.

Usage: ``python train/sr_teacher.py --config RECIPE.yaml [key=value ...] [--out DIR] [--resume] [--scale 2]``
(default ``--out assets/teachers/sr-x4``). See ``fastdiff.sr.teacher``; the command line is train/teacher.py's.
``--scale 2`` trains YONOS-SR's x2 teacher (``scale=2``; it overrides the recipe's ``scale:``), e.g.
``python train/sr_teacher.py --config assets/configs/teacher_sr_x2.yaml --scale 2 --out assets/teachers/sr-x2``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import teacher  # noqa: E402  (sets the OpenMP wait policy before torch loads)


def scale_overrides(argv: list[str]) -> list[str]:
    """``--scale N`` / ``--scale=N`` as the override ``scale=N`` (placed last, so it wins over the recipe)."""
    args, scale = [], None
    it = iter(argv)
    for a in it:
        if a == "--scale":
            scale = next(it, None)
            if scale is None:
                sys.exit("--scale needs a value (2 or 4)")
        elif a.startswith("--scale="):
            scale = a.split("=", 1)[1]
        else:
            args.append(a)
    return args + ([f"scale={scale}"] if scale is not None else [])


if __name__ == "__main__":
    teacher.main(
        scale_overrides(sys.argv[1:]),
        module="fastdiff.sr.teacher",
        config="assets/configs/teacher_sr.yaml",
        out="assets/teachers/sr-x4",
        description=__doc__.splitlines()[0],
    )
