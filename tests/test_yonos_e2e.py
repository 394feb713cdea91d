"""YONOS-SR end to end on tiny models: ``accelerate launch train/distill.py --config assets/configs/sr_yonos.yaml``
(scale distillation, then the decoder stage), the export loaded and run at one step in plain diffusers with the tuned
VAE (encoder and UNet untouched by stage 2), ``fastdiff bench sr`` on it unchanged, and every shipped yonos recipe
(sr_yonos, sd_x4_yonos) run in-process on a tiny teacher of its family as the every-recipe test does."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_e2e_tiny import REPO, _check_any_call, launch  # noqa: E402

YONOS_RECIPES = sorted((REPO / "assets/configs").glob("*_yonos.yaml"))


@pytest.fixture(scope="module")
def tiny_x2(tiny_teachers, tmp_path_factory):
    from fastdiff.sr.teacher import init_scale_teacher

    return str(init_scale_teacher(tiny_teachers["sd-x4"], tmp_path_factory.mktemp("x2") / "x2"))


def test_launch_two_stages_export_plain_diffusers_and_bench(tiny_teachers, tiny_x2, tmp_path):
    from diffusers import StableDiffusionUpscalePipeline

    from fastdiff.eval.bench_sr import run as bench_sr
    from fastdiff.sr.data import example_low_res

    out = tmp_path / "out"
    launch([
        "--config", str(REPO / "assets/configs/sr_yonos.yaml"), f"teacher={tiny_teachers['sd-x4']}",
        f"yonos.scale_teachers=[{tiny_x2}]", f"output_dir={out}", "resolution=32", "max_steps=4",
        "yonos.decoder_steps=2", "train_batch_size=2", "checkpointing_steps=2", "validation_steps=4",
    ])  # fmt: skip
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["method"] == "yonos" and info["pipeline_class"] == "StableDiffusionUpscalePipeline"
    assert (info["num_inference_steps"], info["guidance_scale"], info["timesteps"]) == (1, 0.0, [999])
    assert info["scheduler"] == "DDIMScheduler" and info["timesteps_derivable"] and info["decoder_tuned"]
    assert info["check"]["max_abs_diff_latents"] < 1e-4
    terms = json.loads((out / "checkpoints/checkpoint-4/trainer_state.json").read_text())["last_terms"]
    assert {"student/distill", "decoder/l1"} <= set(terms)
    # stage 2 moved the decoder only: the UNet is the stage-1 checkpoint's, the encoder the teacher's
    stage1 = load_file(str(out / "checkpoints/checkpoint-2/trainable.safetensors"))
    unet = load_file(str(out / "pipeline/unet/diffusion_pytorch_model.safetensors"))
    student = {k.removeprefix("student/"): v for k, v in stage1.items() if k.startswith("student/")}
    assert student and all(torch.equal(unet[k], v) for k, v in student.items())
    vae = load_file(str(out / "pipeline/vae/diffusion_pytorch_model.safetensors"))
    teacher_vae = load_file(str(Path(tiny_teachers["sd-x4"]) / "vae/diffusion_pytorch_model.safetensors"))
    frozen = [k for k in vae if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(vae[k], teacher_vae[k]) for k in frozen)
    assert any(not torch.equal(vae[k], teacher_vae[k]) for k in vae if k.startswith("decoder."))
    assert "YONOS-SR" in (out / "README.md").read_text() and (out / "samples/export_grid.png").is_file()

    pipe = StableDiffusionUpscalePipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    lr = example_low_res(1, 32)[0]
    image = pipe(prompt="", image=lr, num_inference_steps=1, guidance_scale=0).images[0]
    assert image.size == (4 * lr.size[0], 4 * lr.size[1])

    rows = bench_sr(out, tmp_path / "bench", teacher_steps=[1], max_patches=4, latency_reps=1)
    assert [r["system"] for r in rows] == ["bicubic", "teacher-1", "yonos-1"]


@pytest.mark.parametrize("recipe", YONOS_RECIPES, ids=[p.stem for p in YONOS_RECIPES])
def test_every_yonos_recipe_runs_on_a_tiny_teacher(recipe, tiny_teachers, tiny_x2, tmp_path, monkeypatch):
    """What tests/test_e2e_tiny.py's every-recipe test does for a super-resolution recipe, with the tiny x2 teacher."""
    from fastdiff.config import load_config
    from fastdiff.run import train

    monkeypatch.chdir(REPO)
    cfg = load_config(recipe, [
        f"teacher={tiny_teachers['sd-x4']}", f"yonos.scale_teachers=[{tiny_x2}]", "max_steps=3",
        "yonos.decoder_steps=1", "resolution=64", f"output_dir={tmp_path}", "train_batch_size=1",
        "checkpointing_steps=3", "validation_steps=3", "cpu_threads=1",
    ])  # fmt: skip
    train(cfg)
    info = json.loads((tmp_path / "fastdiff.json").read_text())
    assert info["timesteps"] == [999] and info["timesteps_derivable"] and info["sampler"] == "ddim"
    assert info["check"]["max_abs_diff_latents"] < (0.25 if cfg.mixed_precision == "bf16" else 1e-3)
    _check_any_call(tmp_path, info)  # diffusers' default call and other step counts run (DDIM, trailing)
