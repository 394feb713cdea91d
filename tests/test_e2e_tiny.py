"""End to end on tiny SDXL / SD1.5 teachers: accelerate launch, checkpoint, resume, export, plain-diffusers load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import launch_command, launch_env
from safetensors.torch import load_file

from fastdiff.config import load_config
from fastdiff.run import cpu_threads, load_checkpoint_method, train
from fastdiff.schedule import ddim_timesteps
from fastdiff.sr.teacher import init_scale_teacher

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"
PROMPT = "a red square"


def launch(args: list[str], num_processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        launch_command(num_processes) + [str(REPO / "train/distill.py"), *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def state(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoints/checkpoint-{step}/trainer_state.json").read_text())


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_launch_checkpoint_resume_export_and_plain_diffusers_load(tiny_teachers, tmp_path, family):
    out = tmp_path / "out"
    common = ["--config", str(TINY_RECIPE), f"teacher={tiny_teachers[family]}", f"output_dir={out}"]
    launch(common + ["max_steps=20", "export=false"])
    assert state(out, 20)["step"] == 20 and not (out / "pipeline").exists()
    proc = launch(common + ["max_steps=24", "resume_from_checkpoint=latest", "checkpointing_steps=4"])
    assert "resumed from" in proc.stdout + proc.stderr
    assert state(out, 24)["step"] == 24
    assert sorted(p.name for p in (out / "samples").glob("step-*.png"))  # validation grids
    recipe = json.loads((out / "fastdiff.json").read_text())
    for key in (
        "method",
        "num_inference_steps",
        "guidance_scale",
        "timesteps",
        "lora_scale",
        "teacher",
        "config",
    ):
        assert key in recipe
    assert recipe["timesteps"] == [999, 749, 499, 249] and recipe["timesteps_derivable"]
    assert (out / "README.md").read_text().count("load_lora_weights") == 1
    assert (out / "samples/export_grid.png").is_file()

    # a separate process that imports only diffusers
    dest = tmp_path / "latents.safetensors"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/diffusers_only_sample.py"),
            str(out),
            tiny_teachers[family],
            PROMPT,
            str(dest),
        ],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    theirs = load_file(str(dest))
    assert set(theirs) == {"pipeline", "lora_diffusers", "lora_kohya"}

    # fastdiff's own sampler from the checkpoint, same seed
    method, teacher, _ = load_checkpoint_method(out / "checkpoints/checkpoint-24")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((1, *teacher.latent_shape()), generator=gen)
    with torch.no_grad():
        ours = method.generate(noise, teacher.encode([PROMPT]), generator=gen)
    for name, latents in theirs.items():
        torch.testing.assert_close(latents, ours, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # the student moved away from the teacher (the comparison is not vacuous)
    with torch.no_grad():
        teacher_x0 = teacher.denoiser(adapter=None)(noise, 999, teacher.encode([PROMPT]))
        moved = float((teacher_x0 - method.generator(noise, 999, teacher.encode([PROMPT]))).abs().max())
    assert moved > 1e-4


def test_resume_matches_uninterrupted_run(tiny_teachers, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(REPO)
    base = [
        f"teacher={tiny_teachers['sdxl']}",
        "export=false",
        "checkpointing_steps=10",
        "validation_steps=100",
    ]
    train(load_config(TINY_RECIPE, base + [f"output_dir={tmp_path / 'a'}", "max_steps=20"]))
    train(load_config(TINY_RECIPE, base + [f"output_dir={tmp_path / 'b'}", "max_steps=10"]))
    train(
        load_config(
            TINY_RECIPE,
            base + [f"output_dir={tmp_path / 'b'}", "max_steps=20", "resume_from_checkpoint=latest"],
        )
    )
    a = load_file(str(tmp_path / "a/checkpoints/checkpoint-20/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/checkpoint-20/trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    moved = load_file(str(tmp_path / "b/checkpoints/checkpoint-10/trainable.safetensors"))
    assert any(not torch.equal(moved[k], a[k]) for k in a)


def test_two_cpu_ranks_stay_synchronised(tiny_teachers, tmp_path):
    out = tmp_path / "out"
    launch(
        [
            "--config",
            str(TINY_RECIPE),
            f"teacher={tiny_teachers['sdxl']}",
            f"output_dir={out}",
            "max_steps=6",
            "checkpointing_steps=6",
            "validation_steps=100",
            "export=false",
        ],
        num_processes=2,
    )
    s = state(out, 6)
    assert s["num_processes"] == 2
    sums, losses = s["param_checksum_by_rank"], s["loss_by_rank"]
    assert len(sums) == 2 and sums[0] == pytest.approx(
        sums[1], rel=1e-9, abs=1e-9
    )  # same weights on both ranks
    assert losses[0] != losses[1]  # ... although each rank saw different data: gradients were averaged


def test_real_images_switch_on_gan_and_corrupt_images_are_skipped(
    tiny_teachers, tmp_path, monkeypatch, one_thread
):
    from PIL import Image

    monkeypatch.chdir(REPO)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, color in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (40, 40), color).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {color} square"})
    (data / "broken.png").write_bytes(b"not an image")
    rows.append({"file_name": "broken.png", "text": "a broken square"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        TINY_RECIPE,
        [
            f"teacher={tiny_teachers['sdxl']}",
            f"output_dir={tmp_path / 'out'}",
            f"dataset={data}",
            "max_steps=6",
            "checkpointing_steps=6",
            "export=false",
            "prompts=null",
            "report_to=tensorboard",
        ],
    )
    with pytest.warns(UserWarning, match="broken.png"):
        train(cfg)
    terms = state(tmp_path / "out", 6)["last_terms"]
    assert "critic/gan_d" in terms and "generator/gan_g" in terms
    assert list((tmp_path / "out/logs").rglob("events.out.tfevents.*"))  # the tracker wrote its log


def _agd_timesteps(cfg) -> list[int]:
    """AGD's adapters sit on the teacher: its (configured) scheduler's timesteps at the recorded step count."""
    from fastdiff.methods.agd import make_scheduler
    from fastdiff.teacher import Teacher

    teacher = Teacher(cfg.teacher)
    sched = make_scheduler(teacher.pipeline.scheduler, cfg.section.scheduler, cfg.section.scheduler_kwargs)
    sched.set_timesteps(cfg.section.num_inference_steps)
    return [int(t) for t in sched.timesteps.tolist()]


def _recipe_timesteps(step: dict, teacher: str) -> list[int]:
    """The timesteps a per-step-count recipe of fastdiff.json samples at: its explicit ``timesteps``, else those its
    scheduler (class + kwargs on the teacher's scheduler config) derives from its step count."""
    from fastdiff.recipe import make_scheduler

    if "timesteps" in step:
        return list(step["timesteps"])
    config = json.loads((Path(teacher) / "scheduler/scheduler_config.json").read_text())
    sched = make_scheduler(config, step["scheduler"], step["scheduler_kwargs"])
    sched.set_timesteps(step["num_inference_steps"])
    return [int(t) for t in sched.timesteps.tolist()]


RECIPES = sorted(p for p in (REPO / "assets/configs").glob("*.yaml") if not p.name.startswith("teacher_"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_on_a_tiny_teacher_of_its_family(
    recipe, tiny_teachers, tmp_path, monkeypatch, one_thread
):
    monkeypatch.chdir(REPO)
    family = "sd15" if recipe.name.startswith("sd15") else "sdxl"
    if recipe.name.startswith(("sr_", "sd_x4_")):  # super-resolution recipes: an x4 upscaler teacher
        family = "sd-x4"
    cfg = load_config(
        recipe,
        [
            f"teacher={tiny_teachers[family]}",
            "max_steps=3",
            *(
                ["dataset=builtin:digits"] if "tscd" in recipe.read_text() else []
            ),  # TSCD trains on real images
            *(["agd.num_trajectories=2", "agd.num_inference_steps=3"] if "agd" in recipe.name else []),
            *(["resolution=64"] if family == "sd-x4" else []),
            *(
                ["tadsr.target_items=2", "tadsr.target_steps=2"]
                if "method: tadsr" in recipe.read_text()
                else []
            ),
            *(
                [
                    f"yonos.scale_teachers=[{init_scale_teacher(tiny_teachers['sd-x4'], tmp_path / 'x2')}]",
                    "yonos.decoder_steps=1",
                ]
                if "method: yonos" in recipe.read_text()
                else []
            ),
            *(
                ["dmd2.regression_pairs=2", "dmd2.regression_sampler_steps=2"]
                if "init: regression" in recipe.read_text()
                else []
            ),
            f"output_dir={tmp_path}",
            f"train_batch_size={2 if 'method: msd' in recipe.read_text() else 1}",  # MSD: a row per student
            "checkpointing_steps=3",
            "validation_steps=3",
        ],
    )
    train(cfg)
    if cfg.cpu_threads is not None:  # the digits recipes use every core even under plain `accelerate launch`
        assert torch.get_num_threads() == cpu_threads(cfg.cpu_threads, 1)
    recipe_out = json.loads((tmp_path / "fastdiff.json").read_text())
    method_cfg = cfg.section
    if cfg.method in (
        "sid",
        "uni",
    ):  # one generator for 1..K steps, each on its own grid, derived by one scheduler
        from fastdiff.methods.sid import step_timesteps

        expected = step_timesteps(method_cfg.num_steps, method_cfg.init_timestep)
        by_k = recipe_out.get("recipes", {})
        assert [_recipe_timesteps(r, tiny_teachers[family]) for r in by_k.values()] == [
            step_timesteps(k, method_cfg.init_timestep) for k in range(1, len(by_k) + 1)
        ] and len(by_k) in (0, method_cfg.num_steps)
        assert recipe_out["step_counts"] == list(range(1, method_cfg.num_steps + 1))  # a K-step SiD: 1..K
        tol = 0.25 if cfg.mixed_precision == "bf16" else 1e-3
        assert all(d < tol for d in recipe_out["check"].get("max_abs_diff_latents_by_steps", {}).values())
    else:
        students = {
            "dmd2": lambda c: c.student_timesteps,
            "msd": lambda c: c.dmd2.student_timesteps,
            "boot": lambda c: [999],  # the one-step generator g(ε, 0) is the UNet at t = 999
            "tadsr": lambda c: [999],
            "yonos": lambda c: [999],  # one DDIM step at t = 999
        }
        expected = (
            students[cfg.method](method_cfg) if cfg.method in students else ddim_timesteps(method_cfg.segments[-1])
        ) if cfg.method != "agd" else _agd_timesteps(cfg)  # fmt: skip
    assert recipe_out["timesteps"] == list(expected) and recipe_out["timesteps_derivable"]
    # The export's self-check compares fastdiff's sampler with the exported pipeline. These recipes train in bf16,
    # which rounds the frozen teacher weights held in memory, while the export rebuilds from the fp32 teacher folder:
    # through four steps of a random tiny UNet that is about 0.1; a wrong scheduler differs by O(1). (fp32 runs
    # agree to 1e-4: test_launch_checkpoint_resume_export_and_plain_diffusers_load.)
    assert recipe_out["check"]["max_abs_diff_latents"] < (0.25 if cfg.mixed_precision == "bf16" else 1e-3)
    _check_any_call(tmp_path, recipe_out)


def _check_any_call(export: Path, recipe: dict) -> None:
    """The exported pipeline, loaded as a diffusers user loads it and called with diffusers' defaults and at other
    step counts, either samples at timesteps the student was trained at or refuses before any UNet call with a
    ValueError. (Students that sample through any diffusers scheduler (AGD) or at any t (TSCD's consistency
    students, DDIM-sampled) run at every count.)"""
    from PIL import Image

    from fastdiff.recipe import load_pipeline

    pipe = load_pipeline(export / "pipeline")  # the standard class, or fastdiff's copy of a custom one
    pipe.set_progress_bar_config(disable=True)
    trained = {int(t) for t in recipe["timesteps"]}
    for r in (recipe.get("recipes") or {}).values():
        trained |= set(_recipe_timesteps(r, recipe["teacher"]) if r.get("scheduler") else [])
    inputs = {}
    if recipe["pipeline_class"] == "StableDiffusionUpscalePipeline":
        inputs = {"image": Image.new("RGB", (16, 16), (90, 120, 150))}
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(int((a[1:] or [kw["timestep"]])[0])), with_kwargs=True
    )
    try:
        for steps in (None, 2, 3, 8):
            seen.clear()
            kwargs = {} if steps is None else {"num_inference_steps": steps}
            try:
                pipe("a red square", **inputs, **kwargs, output_type="latent")
            except ValueError:
                assert not seen, f"{steps} steps: refused after {len(seen)} UNet calls"
                continue
            if recipe["sampler"] == "lcm":
                assert set(seen) <= trained, f"{steps} steps sampled at {sorted(set(seen) - trained)}"
    finally:
        hook.remove()


def test_tscd_lora_runs_at_1_2_4_8_steps_with_the_recorded_schedulers(
    tiny_teachers, tmp_path, monkeypatch, one_thread
):
    """Each k-segment stage's LoRA (lora/<k>step) at its own k with DDIM trailing, the unified LoRA (lora/) with TCD
    at 1 step: in plain diffusers each reproduces fastdiff's sampler with that stage's weights, and `fastdiff
    generate` and `bench quality` run the k-step LoRA."""
    from contextlib import nullcontext

    import numpy as np
    from diffusers import DDIMScheduler, DiffusionPipeline, TCDScheduler
    from PIL import Image

    from fastdiff.cli import main
    from fastdiff.eval import bench_quality

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    cfg = load_config(
        REPO / "assets/configs/digits_tscd.yaml",
        [
            f"teacher={tiny_teachers['sdxl']}",
            f"output_dir={out}",
            "max_steps=4",
            "train_batch_size=2",
            "tscd.stage_steps=[1,1,1,1]",
            "checkpointing_steps=4",
            "validation_steps=4",
        ],
    )
    train(cfg)
    recipe = json.loads((out / "fastdiff.json").read_text())
    assert recipe["sampler"] == "ddim" and recipe["step_counts"] == [1, 2, 4, 8]
    by_k = {k: (r["scheduler"], r["lora"]) for k, r in recipe["recipes"].items()}
    assert by_k == {
        "1": ("TCDScheduler", None),  # the unified LoRA, fused in pipeline/
        "2": ("DDIMScheduler", "lora/2step"),
        "4": ("DDIMScheduler", "lora/4step"),
        "8": ("DDIMScheduler", "lora/8step"),
    }
    for k in (2, 4, 8):
        assert {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors"} <= {
            f.name for f in (out / f"lora/{k}step").iterdir()
        }
    by_steps = recipe["check"]["max_abs_diff_latents_by_steps"]  # the export's self-check covers each recipe
    assert set(by_steps) == {"1", "2", "4", "8"} and all(d < 1e-3 for d in by_steps.values()), by_steps
    method, teacher, _ = load_checkpoint_method(out / "checkpoints/checkpoint-4")
    assert sorted(method.stage_weights) == [
        2,
        4,
        8,
    ]  # the finished stages' LoRAs come back with the checkpoint
    cond = teacher.encode([PROMPT])
    images = {}
    for steps, r in recipe["recipes"].items():
        pipe = DiffusionPipeline.from_pretrained(tiny_teachers["sdxl"])
        pipe.load_lora_weights(out / (r["lora"] or "lora"))
        pipe.fuse_lora(lora_scale=recipe["lora_scale"])
        cls = {"DDIMScheduler": DDIMScheduler, "TCDScheduler": TCDScheduler}[r["scheduler"]]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **r["scheduler_kwargs"])
        kw = {"eta": r["eta"]} if "eta" in r else {}
        call = dict(num_inference_steps=int(steps), guidance_scale=0.0, **kw)
        gen = torch.Generator().manual_seed(0)
        latents = pipe(PROMPT, **call, output_type="latent", generator=gen).images
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((1, *teacher.latent_shape()), generator=gen)
        with method.use_stage_weights(int(steps)) if r["lora"] else nullcontext():
            ours = method.generate(noise, cond, timesteps=int(steps), generator=gen, **kw)
        torch.testing.assert_close(latents, ours, atol=1e-4, rtol=0, msg=lambda m, s=steps: f"{s} steps: {m}")
        images[steps] = pipe(PROMPT, **call, generator=torch.Generator().manual_seed(0)).images[0]
    pixels = {}
    for steps in ("1", "2"):
        path = tmp_path / f"generate-{steps}.png"
        main(["generate", str(out), PROMPT, "--steps", steps, "--out", str(path)])
        pixels[steps] = np.asarray(Image.open(path)).astype(int)
        assert np.abs(pixels[steps] - np.asarray(images[steps]).astype(int)).max() <= 1, steps
    system = bench_quality.export_system(str(out), steps=2)
    assert system.lora == str(out / "lora/2step") and system.pipeline == tiny_teachers["sdxl"]
    assert bench_quality.export_system(str(out), steps=1).pipeline == str(out / "pipeline")
    sampled, _, _ = bench_quality.sample(system, 2, batch=2)
    assert sampled.shape[0] == 2 and torch.isfinite(sampled).all()


def test_sid_few_step_launch_and_export_run_at_every_k_in_plain_diffusers(tiny_teachers, tmp_path):
    import diffusers
    from diffusers import DiffusionPipeline

    from fastdiff.methods.sid import step_timesteps

    out = tmp_path / "out"
    launch(
        [
            "--config",
            str(REPO / "assets/configs/sdxl_sid_4step.yaml"),
            f"teacher={tiny_teachers['sdxl']}",
            f"output_dir={out}",
            "max_steps=4",
            "train_batch_size=2",
            "mixed_precision=no",
            "gradient_checkpointing=false",
            "checkpointing_steps=4",
            "validation_steps=4",
            "sid.lora_rank=4",
            "sid.generator_lr=1e-3",
            "sid.fake_lr=1e-3",
        ]
    )
    recipe = json.loads((out / "fastdiff.json").read_text())
    assert recipe["method"] == "sid" and recipe["timesteps_derivable"]
    assert sorted(recipe["recipes"]) == ["1", "2", "3", "4"]
    method, teacher, _ = load_checkpoint_method(out / "checkpoints/checkpoint-4")
    cond = teacher.encode([PROMPT])
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    saved = pipe.scheduler
    with pytest.raises(ValueError):  # the saved scheduler refuses more steps than trained, before sampling
        pipe(PROMPT, num_inference_steps=5, output_type="latent")
    for k in (1, 2, 3, 4):  # one exported pipeline, every step count with its recipe's diffusers scheduler
        r = recipe["recipes"][str(k)]
        pipe.scheduler = getattr(diffusers, r["scheduler"]).from_config(saved.config, **r["scheduler_kwargs"])
        latents = pipe(
            PROMPT, num_inference_steps=k, guidance_scale=0.0, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        assert pipe.scheduler.timesteps.tolist() == step_timesteps(k, 999)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.shape, generator=gen)
        with torch.no_grad():
            ours = method.generate(noise, cond, timesteps=k, generator=gen)
        torch.testing.assert_close(latents, ours, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k} steps: {m}")
    with torch.no_grad():  # the student moved away from the teacher (the comparison is not vacuous)
        noise = torch.randn((1, *teacher.latent_shape()), generator=torch.Generator().manual_seed(0))
        teacher_x0 = teacher.denoiser(adapter=None)(noise, 999, cond)
        assert float((teacher_x0 - method.generator(noise, 999, cond)).abs().max()) > 1e-4
