"""Train the bundled SR teacher: ``python train/sr_teacher.py --config assets/configs/teacher_sr.yaml``.

Usage: ``python train/sr_teacher.py --config RECIPE.yaml [key=value ...] [--out DIR] [--resume]``
(default ``--out assets/teachers/sr-x4``). See ``fastdiff.sr.teacher``; the command line is train/teacher.py's.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import teacher  # noqa: E402  (sets the OpenMP wait policy before torch loads)

if __name__ == "__main__":
    teacher.main(
        module="fastdiff.sr.teacher",
        config="assets/configs/teacher_sr.yaml",
        out="assets/teachers/sr-x4",
        description=__doc__.splitlines()[0],
    )
