"""AGD guidance adapters on a tiny SDXL UNet: hooks leave the base untouched, zero-init, save/load, bad input."""

import pytest
import torch

from fastdiff.models.adapters import GuidanceAdapters, cross_attention_blocks
from fastdiff.models.tiny import tiny_unet


def _inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    cond = {
        "encoder_hidden_states": torch.randn(n, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(n, 32, generator=g),
            "time_ids": torch.randn(n, 6, generator=g),
        },
    }
    return x, torch.tensor([900, 300]), cond


def _randomise(adapters, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def test_attach_detach_leaves_the_base_bit_identical():
    unet = tiny_unet("sdxl").eval()
    x, t, cond = _inputs()
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    base = unet(x, t, **cond).sample
    adapters = GuidanceAdapters.for_model(unet, hidden_dim=16)
    assert (
        adapters.config.blocks == [n for n, _ in cross_attention_blocks(unet)]
        and len(adapters.attentions) == 8
    )
    adapters.set_guidance(4.0, torch.zeros(2, 77, 64))
    with adapters.attached(unet):  # zero-initialised output projections: exactly the base
        assert torch.equal(unet(x, t, **cond).sample, base)
    _randomise(adapters)
    adapters.attach(unet)
    guided = unet(x, t, **cond).sample
    assert (guided - base).abs().max() > 1e-3  # the adapters act ...
    adapters.set_guidance(8.0, torch.zeros(2, 77, 64))
    assert (unet(x, t, **cond).sample - guided).abs().max() > 1e-6  # ... and read w (float noise: ~1e-7)
    adapters.detach()
    assert torch.equal(unet(x, t, **cond).sample, base)  # detached: the bare base, bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())  # weights never touched


@torch.no_grad()
def test_negative_prompt_tokens_and_per_sample_guidance():
    unet = tiny_unet("sdxl").eval()
    x, t, cond = _inputs()
    adapters = GuidanceAdapters.for_model(unet, hidden_dim=16)
    _randomise(adapters)
    with adapters.attached(unet):
        adapters.set_guidance(3.0, torch.zeros(1, 77, 64))  # batch 1 broadcasts
        zero_neg = unet(x, t, **cond).sample
        adapters.set_guidance(3.0, torch.randn(2, 77, 64))
        assert (
            unet(x, t, **cond).sample - zero_neg
        ).abs().max() > 1e-4  # the negative prompt conditions them
        adapters.set_guidance(torch.tensor([3.0, 9.0]), torch.zeros(2, 77, 64))
        mixed = unet(x, t, **cond).sample
    torch.testing.assert_close(mixed[0], zero_neg[0])  # one w per sample
    assert (mixed[1] - zero_neg[1]).abs().max() > 1e-4


def test_save_and_load_round_trip_through_safetensors(tmp_path):
    unet = tiny_unet("sdxl").eval()
    x, t, cond = _inputs()
    adapters = GuidanceAdapters.for_model(unet, hidden_dim=16, num_heads=2, use_timestep=False, w_max=3.0)
    _randomise(adapters)
    adapters.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters/diffusion_pytorch_model.safetensors").is_file()
    loaded = GuidanceAdapters.from_pretrained(tmp_path / "adapters")
    assert loaded.config.w_max == 3.0 and loaded.t_token is None and loaded.config.num_heads == 2
    for k, v in adapters.state_dict().items():  # parameters and the fixed Fourier features
        assert torch.equal(v, loaded.state_dict()[k]), k
    outs = []
    with torch.no_grad():
        for a in (adapters, loaded):
            a.set_guidance(2.0, torch.zeros(2, 77, 64))
            with a.attached(unet):
                outs.append(unet(x, t, **cond).sample)
    assert torch.equal(*outs)


def _share(unet, **kw) -> float:
    return GuidanceAdapters.for_model(unet, **kw).num_parameters() / unet.num_parameters()


def test_parameter_share_of_the_digits_teacher_and_a_tiny_unet():
    """About 1-5% of the UNet with the recipes' adapter sizes."""
    from diffusers import UNet2DConditionModel

    from fastdiff.demo import DIGITS_TEACHER

    digits = UNet2DConditionModel.from_pretrained(DIGITS_TEACHER / "unet")
    assert 0.01 <= _share(digits, hidden_dim=64, num_heads=4) <= 0.05  # digits_agd.yaml
    assert 0.01 <= _share(tiny_unet("sd15"), hidden_dim=16) <= 0.05


def test_parameter_share_of_full_size_sd15_and_sdxl():
    """sdxl_agd.yaml / sd15_agd.yaml (hidden_dim 320) on the real shapes (DESIGN §7), built without memory:
    measured 2.70% of SDXL's 2.57B (70 blocks) and 1.42% of SD1.5's 860M (16 blocks)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    sdxl = dict(
        sample_size=128,
        block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20],
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    sd15 = dict(
        sample_size=64,
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        attention_head_dim=8,
        cross_attention_dim=768,
    )
    with init_empty_weights():
        shares = {
            name: _share(UNet2DConditionModel(**c), hidden_dim=320)
            for name, c in (("sdxl", sdxl), ("sd15", sd15))
        }
    assert 0.02 < shares["sdxl"] < 0.035 and 0.01 < shares["sd15"] < 0.02, shares


def test_bad_input_is_refused_with_a_clear_error():
    from fastdiff.models.gmm import MLPDenoiser, scaled_linear_alphas_cumprod

    with pytest.raises(ValueError, match="no cross-attention blocks"):
        GuidanceAdapters.for_model(MLPDenoiser(scaled_linear_alphas_cumprod()))
    unet = tiny_unet("sdxl")
    adapters = GuidanceAdapters.for_model(unet, hidden_dim=16)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        adapters.set_guidance(2.0)  # these adapters read the negative prompt
    with pytest.raises(ValueError, match=r"\[batch, tokens, dim\]"):
        adapters.set_guidance(2.0, torch.zeros(77, 64))
    with pytest.raises(ValueError, match="built for another model"):
        adapters.attach(tiny_unet("sd15"))  # other block names
    x, t, cond = _inputs()
    with adapters.attached(unet):
        with pytest.raises(RuntimeError, match="set_guidance"):
            unet(x, t, **cond)
        adapters.set_guidance(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(1, 77, 64))
        with pytest.raises(ValueError, match="3 values for a batch of 2"):
            unet(x, t, **cond)
        with pytest.raises(RuntimeError, match="another GuidanceAdapters set"):
            GuidanceAdapters.for_model(unet, hidden_dim=8).attach(unet)
        with pytest.raises(RuntimeError, match="already attached"):
            adapters.attach(unet)
