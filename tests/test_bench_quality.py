"""bench quality: the bench.json schema and its bad-input errors, on a tiny teacher."""

import json

import pytest

from fastdiff.eval import bench_quality
from fastdiff.teacher import TeacherError

KEYS = {"system", "method", "steps", "nfe", "fd_digits", "prompt_accuracy", "latency_ms", "train_seconds"}


def test_bench_json_rows_and_files(tiny_teachers, tmp_path):
    systems = bench_quality.teacher_systems(tiny_teachers["sdxl"], 2.0, steps=(1, 2))
    rows = bench_quality.run(systems, tmp_path, n=20, batch=10)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == rows and len(rows) == 2
    for row, steps in zip(rows, (1, 2)):
        assert KEYS <= row.keys()
        assert row["steps"] == steps and row["nfe"] == 2 * steps  # CFG doubles the UNet calls
        assert row["train_seconds"] is None and row["latency_ms"] > 0
        assert 0 <= row["prompt_accuracy"] <= 1 and row["fd_digits"] >= 0
        assert (tmp_path / "grids" / f"{row['system']}.png").is_file()
    table = (tmp_path / "bench.md").read_text()
    assert "teacher-1" in table and "fd_digits" in table


def test_bad_inputs(tiny_teachers, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="not a diffusers pipeline"):
        bench_quality.run(
            bench_quality.teacher_systems(str(tmp_path / "empty"), 2.0, (1,)), tmp_path / "o", n=4
        )
    with pytest.raises(ValueError, match="must be positive"):
        bench_quality.run(
            bench_quality.teacher_systems(tiny_teachers["sdxl"], 2.0, (1,)), tmp_path / "o", n=0
        )
    with pytest.raises(FileNotFoundError, match="fastdiff.json"):
        bench_quality.export_system(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="classifier"):
        bench_quality.run(
            bench_quality.teacher_systems(tiny_teachers["sdxl"], 2.0, (1,)),
            tmp_path / "o",
            n=4,
            classifier=tmp_path / "no-classifier",
        )
