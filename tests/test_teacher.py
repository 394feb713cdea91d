"""The teacher: folder checks with clear errors, conditioning, denoisers read as x0, CFG, VAE round trip."""

import json
import shutil

import pytest
import torch

from fastdiff.models.denoiser import CFG, Cond
from fastdiff.models.tiny import TEXT_HIDDEN, save_tiny
from fastdiff.teacher import Teacher, TeacherError, check_pipeline_folder


@pytest.fixture(scope="module")
def folders(_one_thread, tmp_path_factory):
    """Tiny random-init teacher folders, built once for this module."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "sdxl": save_tiny("sdxl", root / "sdxl"),
        "sd15": save_tiny("sd15", root / "sd15"),
        "sdxl_v": save_tiny("sdxl", root / "sdxl_v", prediction_type="v_prediction"),
    }


@pytest.fixture(scope="module")
def teachers(folders):
    return {name: Teacher(path) for name, path in folders.items()}


def _latents(n=2, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- errors -----------------------------------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(TeacherError, match="not found") as info:
        Teacher(missing)
    assert str(missing) in str(info.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(TeacherError, match="not a diffusers pipeline folder") as info:
        Teacher(tmp_path)
    assert "model_index.json" in str(info.value)


def test_unsupported_pipeline_class(folders, tmp_path):
    copy = shutil.copytree(folders["sd15"], tmp_path / "inpaint")
    index = copy / "model_index.json"
    data = json.loads(index.read_text())
    data["_class_name"] = "StableDiffusionInpaintPipeline"
    index.write_text(json.dumps(data))
    with pytest.raises(TeacherError) as info:
        Teacher(copy)
    msg = str(info.value)
    assert "StableDiffusionInpaintPipeline" in msg
    assert "StableDiffusionPipeline" in msg and "StableDiffusionXLPipeline" in msg
    assert "supported" in msg


def test_invalid_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(TeacherError, match="model_index.json"):
        check_pipeline_folder(tmp_path)


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder of that name relative to the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError) as info:
        Teacher("stabilityai/sdxl-turbo")
    msg = str(info.value)
    assert "stabilityai/sdxl-turbo" in msg
    assert "offline" in msg and "HF_HUB_OFFLINE" in msg
    assert "folder" in msg


def test_supported_folders_pass_the_check(folders):
    assert check_pipeline_folder(folders["sdxl"]) == "StableDiffusionXLPipeline"
    assert check_pipeline_folder(str(folders["sd15"])) == "StableDiffusionPipeline"


# --- loading ----------------------------------------------------------------------------------------------------
def test_loaded_attributes(teachers):
    sdxl, sd15, sdxl_v = teachers["sdxl"], teachers["sd15"], teachers["sdxl_v"]
    assert (sdxl.family, sd15.family) == ("sdxl", "sd15")
    assert sdxl.prediction_type == "epsilon" and sdxl_v.prediction_type == "v_prediction"
    assert sdxl.resolution == 32 and sd15.resolution == 32
    torch.testing.assert_close(sdxl.alphas_cumprod, sdxl.pipeline.scheduler.alphas_cumprod.float())
    frozen = [p.requires_grad for p in sdxl.unet.parameters()] + [
        p.requires_grad for p in sdxl.vae.parameters()
    ]
    assert not any(frozen)


def test_latent_shape(teachers):
    t = teachers["sdxl"]
    assert t.latent_shape(32) == (4, 8, 8)
    assert t.latent_shape() == (4, 8, 8)
    assert t.latent_shape(64) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        t.latent_shape(30)


# --- conditioning -----------------------------------------------------------------------------------------------
def test_sdxl_encode_shapes_and_time_ids(teachers):
    t = teachers["sdxl"]
    c = t.encode(["a red square", "a blue circle"])
    assert c.prompt_embeds.shape == (2, 77, 2 * TEXT_HIDDEN)
    assert c.pooled.shape == (2, TEXT_HIDDEN)
    assert c.time_ids.shape == (2, 6)
    assert torch.equal(c.time_ids, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    c64 = t.encode(["a red square"], resolution=64)
    assert torch.equal(c64.time_ids, torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    assert torch.equal(c64.prompt_embeds[0], c.prompt_embeds[0])


def test_sd15_encode_shapes(teachers):
    c = teachers["sd15"].encode(["a red square", "a blue circle"])
    assert c.prompt_embeds.shape == (2, 77, TEXT_HIDDEN)
    assert c.pooled is None and c.time_ids is None


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_encode_cache(teachers, name, monkeypatch):
    t = teachers[name]
    first = t.encode(["cached prompt a", "cached prompt b", "cached prompt a"])
    assert torch.equal(first.prompt_embeds[0], first.prompt_embeds[2])
    assert not torch.equal(first.prompt_embeds[0], first.prompt_embeds[1])

    calls = []
    real = t._encode
    monkeypatch.setattr(t, "_encode", lambda prompts, res: calls.append(list(prompts)) or real(prompts, res))
    again = t.encode(["cached prompt b", "cached prompt a"])
    assert calls == []  # nothing re-encoded
    assert torch.equal(again.prompt_embeds[0], first.prompt_embeds[1])
    assert torch.equal(again.prompt_embeds[1], first.prompt_embeds[0])
    if name == "sdxl":
        assert torch.equal(again.pooled[1], first.pooled[0])
    t.encode(["cached prompt a", "a new prompt"])
    assert calls == [["a new prompt"]]  # only the missing prompt is encoded


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_encode_does_not_depend_on_batch(teachers, name, monkeypatch):
    t = teachers[name]
    monkeypatch.setattr(t, "_cache", {})  # encode afresh, both times
    alone = t.encode(["batch independence"])
    t._cache.clear()
    together = t.encode(["something else entirely, longer", "batch independence"])
    torch.testing.assert_close(together.prompt_embeds[1], alone.prompt_embeds[0])


def test_null_cond_sdxl_is_zeros(teachers):
    t = teachers["sdxl"]
    n = t.null_cond(3)
    assert len(n) == 3
    assert n.prompt_embeds.shape == (3, 77, 2 * TEXT_HIDDEN) and n.pooled.shape == (3, TEXT_HIDDEN)
    assert not n.prompt_embeds.any() and not n.pooled.any()
    assert torch.equal(n.time_ids, t.encode(["x"] * 3).time_ids)  # time ids are kept, not zeroed
    assert t.encode([""]).prompt_embeds.any()  # the zeros are not the empty prompt's embedding


def test_null_cond_sd15_is_empty_prompt(teachers):
    t = teachers["sd15"]
    n = t.null_cond(2)
    empty = t.encode([""])
    assert n.prompt_embeds.shape == (2, 77, TEXT_HIDDEN)
    assert torch.equal(n.prompt_embeds, empty.prompt_embeds.expand(2, -1, -1))
    assert n.prompt_embeds.any()


# --- denoisers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sdxl", "sdxl_v", "sd15"])
def test_unet_denoiser_x0_by_hand(teachers, name):
    t = teachers[name]
    x_t = _latents(2, seed=1)
    ts = torch.tensor([50, 800])
    cond = t.encode(["a red square", "a blue circle"])
    x0 = t.denoiser()(x_t, ts, cond)

    kw = {"encoder_hidden_states": cond.prompt_embeds}
    if cond.pooled is not None:
        kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.no_grad():
        out = t.unet(x_t, ts, **kw).sample
    acp = t.pipeline.scheduler.alphas_cumprod[ts].view(-1, 1, 1, 1)
    if t.prediction_type == "epsilon":
        expected = (x_t - (1 - acp).sqrt() * out) / acp.sqrt()
    else:
        expected = acp.sqrt() * x_t - (1 - acp).sqrt() * out
    assert x0.shape == x_t.shape and x0.dtype == torch.float32
    torch.testing.assert_close(x0, expected, atol=1e-4, rtol=1e-4)


def test_denoiser_scalar_timestep(teachers):
    t = teachers["sdxl"]
    d = t.denoiser()
    x_t = _latents(2, seed=2)
    cond = t.encode(["a", "b"])
    torch.testing.assert_close(d(x_t, torch.tensor(500), cond), d(x_t, torch.tensor([500, 500]), cond))


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_cfg(teachers, name):
    t = teachers[name]
    d = t.denoiser()
    x_t = _latents(2, seed=3)
    ts = torch.tensor([300, 700])
    cond = t.encode(["a red square", "a blue circle"])
    with torch.no_grad():
        plain = d(x_t, ts, cond)
        uncond = d(x_t, ts, t.null_cond(2))
        assert torch.equal(CFG(d, 1.0, t.null_cond)(x_t, ts, cond), plain)
        w = 4.5
        guided = CFG(d, w, t.null_cond)(x_t, ts, cond)
    torch.testing.assert_close(guided, uncond + w * (plain - uncond), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(guided, plain, atol=1e-3)


# --- VAE --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_vae_round_trip_shapes(teachers, name):
    t = teachers[name]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = t.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, *t.latent_shape(32)) and z.dtype == torch.float32
    z_again = t.encode_images(pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z_again)  # the posterior sample follows the generator
    images = t.decode(z)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_cond_helpers():
    c = Cond(torch.zeros(3, 77, 8), torch.ones(3, 4), torch.zeros(3, 6))
    assert len(c[[0, 2]]) == 2
    kw = c.unet_kwargs()
    assert set(kw) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(Cond(torch.zeros(1, 77, 8)).unet_kwargs()) == {"encoder_hidden_states"}
