"""SR groundwork: the bundled photographs' fixed split, x4 pairs, the bicubic baseline, and the tiny
``StableDiffusionUpscalePipeline`` (``fastdiff tiny --family sd-x4``) in plain diffusers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.sr import data


def test_split_is_fixed_and_never_overlaps():
    assert set(data.TRAIN).isdisjoint(data.HELD_OUT)
    assert set(data.TRAIN) | set(data.HELD_OUT) == set(data.PHOTOS)
    assert data.HELD_OUT == ("chelsea", "flower", "camera", "coins")
    train = data.grid_pairs("train")
    heldout = data.grid_pairs("heldout")
    assert set(train.names).isdisjoint(heldout.names)
    assert set(heldout.names) == set(data.HELD_OUT)
    # random training crops come from training photos only
    crops = data.random_pairs(64, torch.Generator().manual_seed(0))
    assert set(crops.names) <= set(data.TRAIN)


def test_every_photo_loads_offline_as_rgb_in_range():
    for name in data.PHOTOS:
        image = data.load_photo(name)
        assert image.dtype == torch.float32 and image.shape[0] == 3 and min(image.shape[1:]) >= 64, name
        assert -1 <= image.min() and image.max() <= 1, name
    grey = data.load_photo("camera")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    with pytest.raises(KeyError, match="unknown photo"):
        data.load_photo("lena")


def test_pair_shapes_and_degradation():
    pairs = data.grid_pairs("heldout", size=64)
    n = len(pairs)
    assert n == len(pairs.names) > 0
    assert pairs.hr.shape == (n, 3, 64, 64) and pairs.lr.shape == (n, 3, 16, 16)
    assert torch.equal(pairs.lr, data.downscale(pairs.hr))
    # LR is on 8-bit levels: a PIL round trip is exact
    assert torch.equal(data.from_pil(data.to_pil(pairs.lr[0])), pairs.lr[0])
    assert data.bicubic_upscale(pairs.lr).shape == pairs.hr.shape
    # a constant image stays constant through downscale and the bicubic baseline
    flat = torch.full((3, 32, 32), 0.2)
    assert torch.allclose(
        data.bicubic_upscale(data.downscale(flat)), data.downscale(flat).mean(), atol=1 / 127.5
    )
    with pytest.raises(ValueError, match="divisible"):
        data.downscale(torch.zeros(3, 30, 32))
    small = data.grid_pairs("heldout", size=32, stride=16)
    assert small.hr.shape[1:] == (3, 32, 32) and small.lr.shape[1:] == (3, 8, 8) and len(small) > n


def test_grid_is_deterministic_and_random_crops_follow_the_generator():
    image = torch.arange(3 * 10 * 13, dtype=torch.float32).reshape(3, 10, 13)
    patches = data.grid_patches(image, size=4)
    assert patches.shape == (2 * 3, 3, 4, 4)
    # centred grid: 2 rows of 4 in 10 (top offset 1), 3 columns of 4 in 13 (left offset 0)
    assert torch.equal(patches[0], image[:, 1:5, 0:4])
    assert data.grid_patches(image, size=11).shape == (0, 3, 11, 11)
    a = data.random_pairs(4, torch.Generator().manual_seed(3))
    b = data.random_pairs(4, torch.Generator().manual_seed(3))
    c = data.random_pairs(4, torch.Generator().manual_seed(4))
    assert torch.equal(a.hr, b.hr) and a.names == b.names
    assert not torch.equal(a.hr, c.hr)


def test_tiny_sd_x4_loads_and_upscales_in_plain_diffusers(tmp_path, capsys):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    from fastdiff.cli import main

    out = tmp_path / "tiny-sd-x4"
    main(["tiny", "--family", "sd-x4", "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline"

    pipe = StableDiffusionUpscalePipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 7 and pipe.unet.config.num_class_embeds >= 351
    assert pipe.vae.config.scaling_factor == 0.08333 and pipe.config.max_noise_level == 350
    assert isinstance(pipe.low_res_scheduler, DDPMScheduler) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.tokenizer) == 514

    lr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt="", image=lr, num_inference_steps=2, guidance_scale=0, generator=generator).images[0]
    assert image.size == (64, 64)
