"""Tiny SD1.5-, SDXL- and SD-x4-upscaler-shaped pipelines built offline from configs (random init).

They have the real architectures (UNet2DConditionModel with cross-attention, SDXL's text_time conditioning, two
CLIP text encoders, an AutoencoderKL; the x4 upscaler's 7-channel UNet with the noise level as class label and its
VAE that downsamples 4x) at a size that trains on a CPU in seconds, and save as ordinary diffusers folders. The
tokenizer is a byte-level CLIP BPE tokenizer built in memory: no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("sd15", "sdxl", "sd-x4")
TEXT_HIDDEN = 32
# The real checkpoints' prediction types (stable-diffusion-x4-upscaler is v-prediction).
DEFAULT_PREDICTION_TYPE = {"sd15": "epsilon", "sdxl": "epsilon", "sd-x4": "v_prediction"}
UPSCALER_VAE_SCALING = 0.08333  # what StableDiffusionUpscalePipeline insists on
UPSCALER_MAX_NOISE_LEVEL = 350


def _bytes_to_unicode() -> list[str]:
    """The printable-character alphabet CLIP's byte-level BPE uses for the 256 byte values."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def make_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over single bytes (every word is spelled out): 514 tokens, built in memory."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    return tok


def _text_encoder(with_projection: bool, vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_unet(family: str, prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8):
    """A random-init UNet2DConditionModel shaped like the family's (about 1-2M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if family == "sdxl":
        return UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4),
            cross_attention_dim=2 * TEXT_HIDDEN,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
        )
    if family == "sd15":
        return UNet2DConditionModel(**common, attention_head_dim=8, cross_attention_dim=TEXT_HIDDEN)
    if family == "sd-x4":
        # Input = 4 latent + 3 noised low-resolution image channels; the noise level enters as class label
        # (num_class_embeds 1000 as the real upscaler); cross-attention-only transformers except the deepest.
        return UNet2DConditionModel(
            **{**common, "in_channels": 7},
            attention_head_dim=8,
            cross_attention_dim=TEXT_HIDDEN,
            use_linear_projection=True,
            only_cross_attention=(True, False),
            num_class_embeds=1000,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_vae(seed: int = 0, scaling_factor: float = 0.18215):
    """A random-init AutoencoderKL with 3 blocks: it down- and upsamples 4x (the x4 upscaler's factor too)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        scaling_factor=scaling_factor,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    )


def tiny_scheduler(family: str, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
    )
    if family == "sdxl":
        return EulerDiscreteScheduler(**kw, timestep_spacing="leading")
    if family == "sd-x4":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False)
    return PNDMScheduler(**kw, skip_prk_steps=True, set_alpha_to_one=False)


def tiny_low_res_scheduler():
    """The x4 upscaler's low_res_scheduler: the DDPM schedule that noises the low-resolution image."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        clip_sample=True,
        variance_type="fixed_small",
    )


def tiny_pipeline(family: str = "sdxl", prediction_type: str | None = None, seed: int = 0):
    """A random-init StableDiffusionPipeline (sd15, 32x32 images), StableDiffusionXLPipeline (sdxl, 32x32) or
    StableDiffusionUpscalePipeline (sd-x4: any LR size divisible by 2 in, 4x that out). ``prediction_type``
    defaults to the real checkpoint's (``DEFAULT_PREDICTION_TYPE``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLPipeline

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    prediction_type = prediction_type or DEFAULT_PREDICTION_TYPE[family]
    tokenizer = make_tokenizer()
    unet = tiny_unet(family, prediction_type, seed)
    scheduler = tiny_scheduler(family, prediction_type)
    if family == "sd-x4":
        return StableDiffusionUpscalePipeline(
            vae=tiny_vae(seed + 1, scaling_factor=UPSCALER_VAE_SCALING),
            text_encoder=_text_encoder(False, len(tokenizer), seed + 2),
            tokenizer=tokenizer,
            unet=unet,
            low_res_scheduler=tiny_low_res_scheduler(),
            scheduler=scheduler,
            max_noise_level=UPSCALER_MAX_NOISE_LEVEL,
        )
    vae = tiny_vae(seed + 1)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_text_encoder(False, len(tokenizer), seed + 2),
            text_encoder_2=_text_encoder(True, len(tokenizer), seed + 3),
            tokenizer=tokenizer,
            tokenizer_2=make_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_text_encoder(False, len(tokenizer), seed + 2),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny(family: str, out: str | Path, prediction_type: str | None = None, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors)."""
    out = Path(out)
    tiny_pipeline(family, prediction_type, seed).save_pretrained(out, safe_serialization=True)
    return out
