"""The bundled digits teacher: a tiny run of the recipe gives a plain-diffusers SDXL folder; config errors are
clear; the UNet stage resumes exactly; the bundled folder (if trained) loads offline, samples and is small."""

import json
import os
from pathlib import Path

import pytest
import torch

from fastdiff.config import ConfigError
from fastdiff.digits.teacher import (
    TeacherConfig,
    assemble_pipeline,
    build_text_encoders,
    build_unet,
    build_vae,
    folder_mb,
    load_teacher_config,
    sample_teacher,
    train_teacher,
    train_unet,
)
from fastdiff.models.tiny import make_tokenizer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "assets" / "configs" / "teacher_digits.yaml"
BUNDLED = REPO / "assets" / "teachers" / "digits-sdxl"

TINY = [
    "num_threads=1",
    "samples_per_digit=1",
    "eval_guidance_scales=[]",
    "vae.block_out_channels=[8,16,16]",
    "vae.norm_num_groups=8",
    "vae.steps=2",
    "vae.batch_size=4",
    "text.hidden_size=16",
    "text.intermediate_size=32",
    "text.num_hidden_layers=1",
    "text.num_attention_heads=2",
    "text.projection_dim=16",
    "unet.block_out_channels=[16,32]",
    "unet.cross_attention=[false,true]",
    "unet.transformer_layers_per_block=[1,1]",
    "unet.attention_heads=[1,2]",
    "unet.norm_num_groups=8",
    "unet.addition_time_embed_dim=4",
    "unet.steps=2",
    "unet.batch_size=4",
    "unet.warmup_steps=1",
]


def test_recipe_loads_and_unknown_keys_are_errors():
    cfg = load_teacher_config(RECIPE)
    assert cfg.unet.steps > 0 and cfg.text.hidden_size == 64 and 1.0 <= cfg.guidance_scale <= 2.0
    with pytest.raises(ConfigError, match="unknown config key 'unet.stpes'.*steps"):
        load_teacher_config(RECIPE, ["unet.stpes=3"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_teacher_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_teacher_config(REPO / "no-such.yaml")
    bad = load_teacher_config(RECIPE, ["unet.block_out_channels=[16,32]"])
    with pytest.raises(ConfigError, match="one entry per level"):
        build_unet(bad.unet, bad.text, 0)


def test_tiny_run_gives_a_plain_diffusers_folder(tmp_path):
    cfg = load_teacher_config(RECIPE, TINY)
    out = train_teacher(cfg, tmp_path / "teacher")
    names = {p.name for p in out.iterdir()}
    assert {"model_index.json", "fastdiff_teacher.json", "samples.png", "unet", "vae"} <= names
    assert "_train_state" not in names  # checkpoints are removed once the run is done
    info = json.loads((out / "fastdiff_teacher.json").read_text())
    assert info["guidance_scale"] == cfg.guidance_scale and info["num_inference_steps"] == 25
    assert info["stats"]["unet"]["steps"] == 2 and info["config"]["unet"]["steps"] == 2
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "trailing" and sched["beta_schedule"] == "scaled_linear"
    images, labels = sample_teacher(out, 1, steps=25, guidance_scale=1.5)  # plain diffusers, CFG on
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


def _tiny_pipe(cfg):
    te = build_text_encoders(cfg.text, len(make_tokenizer()), 1)
    return assemble_pipeline(build_vae(cfg.vae, 0), te, build_unet(cfg.unet, cfg.text, 2))


def test_unet_stage_resumes_exactly(tmp_path):
    cfg: TeacherConfig = load_teacher_config(None, TINY + ["unet.steps=4", "unet.checkpoint_minutes=0"])
    mean, std = torch.randn(12, 4, 8, 8), torch.rand(12, 4, 8, 8) * 0.1
    labels = torch.arange(12) % 10

    full = _tiny_pipe(cfg)
    train_unet(cfg.unet, full, mean, std, labels, seed=3, state_dir=None)

    part = _tiny_pipe(cfg)
    cfg.unet.steps = 2  # "interrupted" after 2 steps; the checkpoint is written after every step here
    train_unet(cfg.unet, part, mean, std, labels, seed=3, state_dir=tmp_path)
    resumed = _tiny_pipe(cfg)
    cfg.unet.steps = 4
    stats = train_unet(cfg.unet, resumed, mean, std, labels, seed=3, state_dir=tmp_path, resume=True)
    assert stats["steps"] == 4 and [s for s, _ in stats["loss_curve"]] == [2, 4]  # the curve resumes too
    for (name, a), b in zip(full.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not (BUNDLED / "model_index.json").is_file(), reason="bundled teacher not trained yet")
def test_bundled_teacher_loads_offline_and_samples():
    from diffusers import StableDiffusionXLPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert folder_mb(BUNDLED) < 25
    info = json.loads((BUNDLED / "fastdiff_teacher.json").read_text())
    pipe = StableDiffusionXLPipeline.from_pretrained(BUNDLED)
    images, _ = sample_teacher(BUNDLED, 1, steps=25, guidance_scale=info["guidance_scale"], pipe=pipe)
    assert images.shape == (10, 3, 32, 32) and torch.isfinite(images).all()
    assert images.std() > 0.05  # not a blank image
