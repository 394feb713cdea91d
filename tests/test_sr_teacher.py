"""The bundled SR teacher's trainer: the recipe loads, the latent rescaling is exact, a stage resumes exactly, and
a 20-iteration run writes a StableDiffusionUpscalePipeline folder that plain diffusers loads and runs and that
``evaluate`` scores against bicubic."""

import json
from pathlib import Path

import pytest
import torch

from fastdiff.config import ConfigError
from fastdiff.sr.teacher import (
    VAE_SCALING,
    StageConfig,
    VAEConfig,
    batch_generator,
    build_vae,
    evaluate,
    folder_mb,
    init_as_resampler,
    init_unet_as_copy,
    load_teacher_config,
    rescale_latents,
    train_stage,
    train_teacher,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "assets" / "configs" / "teacher_sr.yaml"

TINY = [
    "num_threads=1",
    "eval_max_patches=4",
    "vae.block_out_channels=[16,32,32]",  # groups of 4 at the ends: the recipe's init=resampler
    "vae.norm_num_groups=4",
    "vae.steps=20",
    "vae.batch_size=2",
    "text.hidden_size=16",
    "text.intermediate_size=16",
    "unet.block_out_channels=[16,32]",
    "unet.cross_attention=[false,true]",
    "unet.attention_heads=[1,2]",
    "unet.layers_per_block=1",
    "unet.norm_num_groups=4",  # groups of 4 at 16 channels (unet.init=copy)
    "unet.steps=20",
    "unet.batch_size=2",
    "unet.warmup_steps=2",
]


def test_recipe_loads_and_bad_values_are_errors():
    cfg = load_teacher_config(RECIPE)
    assert cfg.patch_size == 64 and cfg.noise_level == 0 and cfg.num_inference_steps == 20
    assert cfg.unet.ema_decay == 0.995 and len(cfg.unet.block_out_channels) == len(cfg.unet.cross_attention)
    with pytest.raises(ConfigError, match="unknown config key 'unet.stpes'"):
        load_teacher_config(RECIPE, ["unet.stpes=3"])
    with pytest.raises(ConfigError, match="noise_level"):
        load_teacher_config(RECIPE, ["noise_level=351"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_teacher_config(RECIPE, ["patch_size=40"])


@torch.no_grad()
def test_rescale_latents_keeps_the_autoencoder_and_scales_the_posterior():
    vae = build_vae(VAEConfig(block_out_channels=[8, 16, 16], norm_num_groups=8), seed=0).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before = vae.encode(x).latent_dist
    rec_before = vae.decode(before.mean).sample
    rescale_latents(vae, 12.0)
    after = vae.encode(x).latent_dist
    assert vae.config.scaling_factor == VAE_SCALING
    torch.testing.assert_close(after.mean, 12.0 * before.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.std, 12.0 * before.std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.decode(after.mean).sample, rec_before, rtol=1e-4, atol=1e-5)


def _linear_stage(tmp_path, deadline=None, resume=False):
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])

    def loss(step):
        x = torch.randn(8, 3, generator=batch_generator(0, 1, step))
        return (module(x) - x @ target.T).pow(2).mean()

    cfg = StageConfig(steps=6, lr=0.05, warmup_steps=2, ema_decay=0.9, checkpoint_minutes=60.0, log_every=1)
    stats = train_stage("lin", module, loss, cfg, tmp_path, resume=resume, deadline=deadline)
    return module, stats


def test_a_stage_stopped_at_its_deadline_resumes_exactly(tmp_path):
    straight, stats = _linear_stage(tmp_path / "a")
    assert stats["steps"] == 6 and not stats["stopped_early"]
    _, stopped = _linear_stage(tmp_path / "b", deadline=0.0)
    assert stopped["steps"] == 1 and stopped["stopped_early"]
    resumed, stats = _linear_stage(tmp_path / "b", resume=True)
    assert stats["steps"] == 6 and [s for s, _ in stats["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_twenty_iterations_write_a_pipeline_that_diffusers_runs(tmp_path):
    from diffusers import StableDiffusionUpscalePipeline

    from fastdiff.sr.data import grid_pairs, to_pil

    out = train_teacher(load_teacher_config(RECIPE, TINY), tmp_path / "sr")
    assert not (out / "_train_state").exists() and folder_mb(out) < 5
    info = json.loads((out / "fastdiff_teacher.json").read_text())
    assert info["noise_level"] == 0 and info["num_inference_steps"] == 20 and info["guidance_scale"] == 0.0
    assert info["stats"]["unet"]["steps"] == 20 and info["stats"]["vae"]["steps"] == 20
    assert abs(info["stats"]["vae"]["scaled_latent_std"] - 1.0) < 1e-3

    pipe = StableDiffusionUpscalePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 7 and pipe.vae.config.scaling_factor == VAE_SCALING
    assert pipe.scheduler.config.prediction_type == "sample"  # the recipe's x0-predicting UNet
    lr = to_pil(grid_pairs("heldout").lr[0])
    image = pipe(prompt="", image=lr, num_inference_steps=20, guidance_scale=0, noise_level=0).images[0]
    assert image.size == (64, 64)

    result = info["stats"]["evaluate"]
    assert result["patches"] == 4 and result["num_inference_steps"] == 20
    assert set(result["teacher"]) >= {"psnr_y_image", "psnr_y_mean", "psnr_y_pooled", "ssim_y_mean"}
    assert result["bicubic"]["psnr_y_mean"] > 20 and isinstance(result["ship"], bool)
    again = evaluate(out, max_patches=2)
    assert again["patches"] == 2 and again["noise_level"] == 0


def test_the_resampler_start_passes_the_image_through():
    """vae.init=resampler: the encoder writes the 4x4 box average of the image into latent channels 0-2 (0 into
    channel 3) through the GroupNorm at its end; the decoder gives back a constant image exactly and a smooth one
    up to interpolation, through its own GroupNorm."""
    vae = build_vae(VAEConfig(block_out_channels=[16, 32, 32], norm_num_groups=4), 0)
    init_as_resampler(vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        box = torch.nn.functional.avg_pool2d(x, 4)
        assert (post.mean[:, :3] - box).abs().max() < 2e-3 and post.mean[:, 3].abs().max() < 1e-6
        assert torch.allclose(post.std, torch.full_like(post.std, float(torch.exp(torch.tensor(-5.0)))))
        flat = torch.full((1, 4, 8, 8), 0.3)
        flat[:, 3] = 0
        out = vae.decode(flat).sample
        assert (out[..., 8:-8, 8:-8] - 0.3).abs().max() < 2e-3  # the interior (borders see zero padding)
        ramp = torch.linspace(-0.5, 0.5, 8).expand(1, 3, 8, 8)
        smooth = vae.decode(torch.cat([ramp, torch.zeros(1, 1, 8, 8)], 1)).sample
        target = torch.nn.functional.interpolate(ramp, scale_factor=4, mode="bilinear", align_corners=False)
        assert (smooth - target)[..., 8:-8, 8:-8].abs().max() < 0.02
    with pytest.raises(ConfigError, match="groups"):
        init_as_resampler(build_vae(VAEConfig(block_out_channels=[8, 16, 16], norm_num_groups=8), 0))


def test_the_copy_start_predicts_the_lr_image_at_every_t():
    """unet.init=copy: an x0-predicting UNet whose output channels 0-2 are gain x the LR conditioning (interior;
    the borders see zero padding) and channel 3 is 0, whatever the noisy latents, t and noise level."""
    from fastdiff.sr.teacher import TextConfig, UNetConfig, build_unet

    cfg = UNetConfig(
        block_out_channels=[16, 32], cross_attention=[False, True], attention_heads=[1, 2], layers_per_block=1,
        norm_num_groups=4, prediction_type="sample",
    )  # fmt: skip
    unet = build_unet(cfg, TextConfig(hidden_size=16, intermediate_size=16), 0, sample_size=8)
    init_unet_as_copy(unet, [1.5, 2.0, 0.5])
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        for t, level in ((999, 0), (10, 300)):
            x = torch.cat([torch.randn(2, 4, 8, 8), lr], 1)
            out = unet(x, torch.full((2,), t), encoder_hidden_states=torch.randn(2, 77, 16),
                       class_labels=torch.full((2,), level)).sample  # fmt: skip
            want = lr * torch.tensor([1.5, 2.0, 0.5]).view(1, 3, 1, 1)
            assert (out[:, :3] - want).abs().max() < 2e-3 and out[:, 3].abs().max() < 1e-4
    with pytest.raises(ConfigError, match="prediction_type=sample"):
        load_teacher_config(RECIPE, [*TINY, "unet.init=copy", "unet.prediction_type=v_prediction"])
    with pytest.raises(ConfigError, match="unet.init"):
        load_teacher_config(RECIPE, [*TINY, "unet.init=identity"])
