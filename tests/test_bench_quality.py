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


def _recipe(folder, recipe, **extra):
    """An export folder holding only fastdiff.json: ``recipe`` (a ``fastdiff.recipe.Recipe``) and top-level keys."""
    folder.mkdir()
    (folder / "fastdiff.json").write_text(json.dumps({**recipe.to_json(), "lora": None, **extra}))
    return str(folder)


def test_agd_stacked_on_a_student_lora_takes_the_students_sampler_and_one_call_per_step(tmp_path):
    from fastdiff.recipe import Recipe, StepRecipe

    agd_recipe = Recipe(
        "agd", 25, 2.0, list(range(961, 0, -40)), "EulerDiscreteScheduler", sampler="scheduler"
    )
    agd_recipe.extra = {"nfe_per_step": 1, "w_range": [1.0, 12.0]}
    agd = _recipe(tmp_path / "agd", agd_recipe)
    trailing = {"timestep_spacing": "trailing"}
    per_step = StepRecipe(2, 0.0, "DDIMScheduler", trailing)
    tscd = Recipe("tscd", 1, 0.0, [999], "DDIMScheduler", trailing, sampler="ddim", step_counts=[1, 2, 4, 8])
    tscd.recipes = {2: per_step}
    student = _recipe(tmp_path / "tscd", tscd, lora="lora/pytorch_lora_weights.safetensors")
    (tmp_path / "tscd" / "pipeline" / "scheduler").mkdir(parents=True)
    saved = {"_class_name": "DDIMScheduler", "set_alpha_to_one": True, "timestep_spacing": "leading"}
    (tmp_path / "tscd" / "pipeline" / "scheduler" / "scheduler_config.json").write_text(json.dumps(saved))
    s = bench_quality.export_system(agd, guidance_scale=3.0)  # an AGD export at any w
    assert s.guidance_scale == 3.0 and "guidance_scale" not in s.extra and s.steps == 25
    assert bench_quality.export_system(agd, steps=7).steps == 7  # ... and any step count
    s = bench_quality.stacked_system(agd, student, steps=2, guidance_scale=1.5)
    assert (s.name, s.method, s.steps, s.guidance_scale) == ("agd+tscd-2-w1.5", "agd+tscd", 2, 1.5)
    assert s.pipeline == str(tmp_path / "agd" / "pipeline")
    # the student's saved scheduler config, its per-step options on top
    assert s.scheduler == {"class": "DDIMScheduler", "timestep_spacing": "trailing", "set_alpha_to_one": True}
    assert s.lora == str(tmp_path / "tscd" / "lora" / "pytorch_lora_weights.safetensors")
    assert bench_quality.nfe(s) == 2  # AGD's guidance needs no second UNet call
    with pytest.raises(ValueError, match=r"samples at \[1, 2, 4, 8\] step"):  # the student's own rule
        bench_quality.stacked_system(agd, student, steps=3, guidance_scale=1.5)
    dmd2 = Recipe("dmd2", 1, 0.0, [999], "LCMScheduler", {"original_inference_steps": 1}, step_counts=[1])
    full = _recipe(tmp_path / "dmd2", dmd2)
    with pytest.raises(ValueError, match="no LoRA"):
        bench_quality.stacked_system(agd, full, steps=1, guidance_scale=1.5)
    with pytest.raises(ValueError, match="not a guidance-adapter export"):
        bench_quality.stacked_system(student, student, steps=2, guidance_scale=1.5)


def test_gmm_bench_refuses_unknown_students(tmp_path):
    from fastdiff.eval.bench_gmm import run

    with pytest.raises(ValueError, match="unknown GMM bench methods"):
        run(tmp_path, methods=["dmd2", "nope"])


def test_cli_rows_per_guidance_scale(tiny_teachers, tmp_path):
    from fastdiff.cli import main

    args = ["bench", "quality", "--teacher", tiny_teachers["sdxl"], "--teacher-steps", "1", "--n", "4"]
    main([*args, "--guidance-scale", "1.5,2", "--batch", "4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["system"], r["guidance_scale"]) for r in rows] == [
        ("teacher-1-w1.5", 1.5),
        ("teacher-1-w2", 2.0),
    ]


def test_a_step_count_with_its_own_lora_runs_it_on_the_teacher(tiny_teachers, tmp_path):
    """A per-step recipe naming a LoRA (TSCD's lora/<k>step): the row loads the teacher fastdiff.json names with
    that LoRA fused at the export's lora_scale (also under AGD's adapters); other counts use pipeline/."""
    from fastdiff.recipe import Recipe, StepRecipe

    ddim = {"timestep_spacing": "trailing"}
    tscd = Recipe("tscd", 1, 0.0, [999], "DDIMScheduler", ddim, sampler="ddim", step_counts=[1, 2])
    tscd.recipes = {
        1: StepRecipe(1, 0.0, "TCDScheduler", {"original_inference_steps": 40}, eta=1.0),
        2: StepRecipe(2, 0.0, "DDIMScheduler", ddim, lora="lora/2step"),
    }
    extra = {
        "lora": "lora/pytorch_lora_weights.safetensors",
        "lora_scale": 0.8,
        "teacher": tiny_teachers["sdxl"],
    }
    folder = _recipe(tmp_path / "tscd", tscd, **extra)
    two = bench_quality.export_system(folder, steps=2)
    assert (two.pipeline, two.lora, two.lora_scale) == (
        tiny_teachers["sdxl"],
        str(tmp_path / "tscd/lora/2step"),
        0.8,
    )
    assert two.scheduler == {"class": "DDIMScheduler", **ddim}
    one = bench_quality.export_system(folder, steps=1)
    assert (one.pipeline, one.lora, one.extra) == (str(tmp_path / "tscd/pipeline"), None, {"eta": 1.0})
    agd_recipe = Recipe(
        "agd", 25, 2.0, list(range(961, 0, -40)), "EulerDiscreteScheduler", sampler="scheduler"
    )
    agd_recipe.extra = {"nfe_per_step": 1}
    agd = _recipe(tmp_path / "agd", agd_recipe)
    assert bench_quality.stacked_system(agd, folder, steps=2, guidance_scale=1.5).lora == two.lora
    tscd.recipes[2].lora = "../elsewhere"
    outside = _recipe(tmp_path / "outside", tscd, **extra)
    with pytest.raises(ValueError, match="outside the export"):
        bench_quality.export_system(outside, steps=2)
