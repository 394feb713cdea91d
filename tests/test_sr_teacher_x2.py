"""YONOS-SR's x2 teacher (``fastdiff.sr.teacher`` at scale 2): the conditioning is exactly the x2 image
space-to-depth, a widened x4 UNet reads its box-downscale at the start, ``--scale 2`` reaches the config, and tiny
runs (from scratch and ``init_from`` an x4 teacher) write a scale-teacher folder that loads and evaluates."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdiff.config import ConfigError
from fastdiff.sr.data import downscale, scale_pairs, space_to_depth
from fastdiff.sr.teacher import (
    evaluate_scale_teacher,
    init_scale_teacher,
    load_scale_teacher,
    load_teacher_config,
    train_teacher,
    widen_conv_in,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE_X2 = REPO / "assets/configs/teacher_sr_x2.yaml"
RECIPE_X4 = REPO / "assets/configs/teacher_sr.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sr_teacher import TINY  # noqa: E402


def test_space_to_depth_is_pixel_unshuffle_of_the_x2_image():
    hr = torch.rand(2, 3, 64, 64) * 2 - 1
    lows = scale_pairs(hr)
    assert lows[2].shape == (2, 3, 32, 32) and torch.equal(lows[4], downscale(hr, 4))
    cond = space_to_depth(lows[2], 2)
    assert cond.shape == (2, 12, 16, 16) and torch.equal(cond, F.pixel_unshuffle(lows[2], 2))
    # channel c*4 + 2i + j = pixel (i, j) of each 2x2 block of colour c
    for c, i, j in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)):
        assert torch.equal(cond[:, c * 4 + 2 * i + j], lows[2][:, c, i::2, j::2])
    assert space_to_depth(lows[4], 1) is lows[4]


@torch.no_grad()
def test_a_widened_unet_reads_the_box_downscale_where_the_x4_unet_read_the_lr_image(tiny_teachers):
    from diffusers import UNet2DConditionModel

    x4 = UNet2DConditionModel.from_pretrained(tiny_teachers["sd-x4"], subfolder="unet").eval()
    x2 = widen_conv_in(x4, 2).eval()
    assert x2.config.in_channels == 4 + 12 and x4.config.in_channels == 7
    g = torch.Generator().manual_seed(0)
    z, big = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    kw = dict(encoder_hidden_states=torch.randn(2, 77, x4.config.cross_attention_dim, generator=g),
              class_labels=torch.tensor([0, 20]))  # fmt: skip
    t = torch.tensor([10, 700])
    wide = x2(torch.cat([z, space_to_depth(big, 2)], 1), t, **kw).sample
    narrow = x4(torch.cat([z, F.avg_pool2d(big, 2)], 1), t, **kw).sample
    torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-5)


def test_scale_flag_and_config():
    sys.path.insert(0, str(REPO / "train"))
    from sr_teacher import scale_overrides

    assert scale_overrides(["--config", "x.yaml", "--scale", "2", "unet.steps=3"]) == [
        "--config", "x.yaml", "unet.steps=3", "scale=2",
    ]  # fmt: skip
    assert scale_overrides(["--scale=2", "--out", "d"]) == ["--out", "d", "scale=2"]
    assert scale_overrides(["--out", "d"]) == ["--out", "d"]  # the x4 command line as it was
    cfg = load_teacher_config(RECIPE_X2)
    assert cfg.scale == 2 and cfg.init_from == "assets/teachers/sr-x4" and cfg.noise_level == 0
    assert load_teacher_config(RECIPE_X4).scale == 4 and load_teacher_config(RECIPE_X4).init_from is None
    assert load_teacher_config(RECIPE_X2, ["scale=4", "init_from=null"]).scale == 4
    with pytest.raises(ConfigError, match="scale must be 4"):
        load_teacher_config(RECIPE_X4, ["scale=3"])
    with pytest.raises(ConfigError, match="set scale=2"):
        load_teacher_config(RECIPE_X2, ["scale=4"])


def _check_folder(out: Path, base: Path):
    info = json.loads((out / "fastdiff_teacher.json").read_text())
    assert (
        info["kind"] == "scale-teacher" and info["scale"] == 2 and info["conditioning"] == "pixel_unshuffle"
    )
    assert info["unshuffle_factor"] == 2 and info["conditioning_channels"] == 12 and info["pipeline"] is None
    # not a pipeline: StableDiffusionUpscalePipeline feeds 3 conditioning channels
    assert not (out / "model_index.json").exists()
    st = load_scale_teacher(out, with_base=True)
    assert st.unet.config.in_channels == 16 and st.factor == 2 and st.scale == 2
    assert st.base == base.resolve() and (st.base / "vae").is_dir()
    return info, st


def test_from_scratch_x2_run_writes_a_scale_teacher_that_loads_and_evaluates(tmp_path):
    cfg = load_teacher_config(RECIPE_X4, [*TINY, "scale=2", "unet.steps=2", "vae.steps=2"])
    out = train_teacher(cfg, tmp_path / "x2")
    info, st = _check_folder(out, out)
    assert info["base"] == "." and (out / "vae").is_dir() and (out / "text_encoder").is_dir()
    result = info["stats"]["evaluate"]
    assert result["patches"] == 4 and result["scale"] == 2
    # the x2 input has more to go on
    assert result["bicubic_x2"]["psnr_y_image"] > result["bicubic_x4"]["psnr_y_image"]


def test_init_from_an_x4_teacher_references_its_vae_and_starts_as_its_widened_unet(tiny_teachers, tmp_path):
    x4 = Path(tiny_teachers["sd-x4"])
    out = init_scale_teacher(x4, tmp_path / "teachers/x2")
    info, st = _check_folder(out, x4)
    assert not (out / "vae").exists()  # the VAE is referenced, not copied
    assert st.prediction_type == "v_prediction"  # the tiny x4 teacher's
    trained = train_teacher(
        load_teacher_config(RECIPE_X2, [f"init_from={x4}", "unet.prediction_type=v_prediction", "unet.steps=1",
                                        "unet.batch_size=2", "eval_max_patches=2", "num_threads=1"]),
        tmp_path / "trained",
    )  # fmt: skip
    info = json.loads((trained / "fastdiff_teacher.json").read_text())
    assert info["stats"]["unet"]["steps"] == 1 and set(info["stats"]["evaluate"]) >= {"teacher", "init_from"}
    again = evaluate_scale_teacher(trained, num_inference_steps=2, max_patches=2)
    assert again["num_inference_steps"] == 2 and again["teacher"]["psnr_y_image"] > 0
