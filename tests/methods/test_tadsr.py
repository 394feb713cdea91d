"""TAD-SR: each loss on hand-computed cases (HSD's gradient, the hinge terms), the time-aware discriminator's t
conditioning, the teacher's image conditioning as the upscale pipeline builds it, and a tiny x4 upscaler end to end
(``accelerate launch``, export loaded and run in plain diffusers, LoRA in both formats)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.methods import losses
from fastdiff.methods.tadsr import TADSR, TADSRConfig
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.gmm import scaled_linear_alphas_cumprod
from fastdiff.models.heads import TimeAwareDiscriminator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_e2e_tiny import REPO, launch  # noqa: E402


class GaussianTeacher(Denoiser):
    """The exact denoiser of data N(0, s² I): x̂0(x_t) = α s² x_t / (α² s² + σ²)."""

    def __init__(self, s: float = 0.5):
        super().__init__(scaled_linear_alphas_cumprod(), prediction_type="sample")
        self.s2 = s * s

    def native(self, x_t, t, cond=None, features=False):
        acp = self.alphas_cumprod[t].view(-1, *[1] * (x_t.ndim - 1))
        a, var = acp.sqrt(), 1 - acp
        return a * self.s2 * x_t / (acp * self.s2 + var)


def _method(**cfg):
    teacher = GaussianTeacher()
    return TADSR(teacher, teacher, None, TADSRConfig(adv_weight=0.0, **cfg), {}, None, 20)


def test_hsd_gradient_is_the_eps_difference_and_pulls_toward_the_target():
    method = _method(hsd_t=[50, 50])
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 8, generator=g)
    x = (y + 0.3 * torch.randn(4, 8, generator=g)).requires_grad_(True)
    method.hsd_loss(x, y, None, torch.Generator().manual_seed(1)).backward()
    # by hand: the same noise n at s = 50, eps = (x_s - α x̂0(x_s)) / σ for both
    g1 = torch.Generator().manual_seed(1)
    s = torch.randint(50, 51, (4,), generator=g1)
    n = torch.randn(4, 8, generator=g1)
    acp = method.alphas_cumprod[50]
    a, sig = acp.sqrt(), (1 - acp).sqrt()

    def eps(z):
        z_s = a * z + sig * n
        return (z_s - a * method.teacher(z_s, s, None)) / sig

    expected = (eps(x.detach()) - eps(y)) / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert float((x.grad * (x.detach() - y)).sum()) > 0  # descent moves x toward y
    x0 = y.clone().requires_grad_(True)
    method.hsd_loss(x0, y, None, torch.Generator().manual_seed(1)).backward()
    assert x0.grad.abs().max() < 1e-6  # at the target: no pull


def test_hinge_terms_by_hand():
    fake, real = torch.tensor([-2.0, 0.0, 0.5]), torch.tensor([2.0, 0.5, -1.0])
    # relu(1 + fake) = [0, 1, 1.5], relu(1 - real) = [0, 0.5, 2]
    assert losses.hinge_discriminator_loss(fake, real).item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert losses.hinge_generator_loss(fake).item() == pytest.approx(0.5)


def test_regression_only_student_loss_is_the_mse_to_the_teacher_target():
    method = _method(hsd_weight=0.0, regression_weight=2.0)
    method.image_cond = lambda low_res, level, noise: None
    g = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(3, 8, generator=g) for k in ("noise", "target", "low_res", "low_res_noise")}
    terms = method.loss("student", batch, 0, g)
    x = method.teacher(batch["noise"], torch.full((3,), 999), None)
    assert set(terms) == {"regression"}
    assert terms["regression"].item() == pytest.approx(2.0 * float((x - batch["target"]).square().mean()))


def test_the_discriminator_depends_on_t():
    torch.manual_seed(0)
    disc = TimeAwareDiscriminator([8, 16], embed_dim=32).eval()  # eval: no power iteration per call
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
    t1, t2 = torch.tensor([10, 10]), torch.tensor([700, 700])
    # the FiLM that carries t starts at zero (the heads first see t only through the teacher's features) ...
    assert torch.equal(disc(feats, t1), disc(feats, t2))
    with torch.no_grad():
        for head in disc.heads:
            head.film.weight.normal_(0, 0.1)
    # ... and once it has weights, the same features at another t give another logit
    assert not torch.allclose(disc(feats, t1), disc(feats, t2), atol=1e-4)
    assert disc(feats, t1).shape == (2,)


def test_teacher_features_and_logits_depend_on_t_and_carry_gradients(tiny_teachers):
    from fastdiff.models.denoiser import encoder_features
    from fastdiff.models.heads import unet_encoder_channels
    from fastdiff.teacher import Teacher

    teacher = Teacher(tiny_teachers["sd-x4"])
    den = teacher.denoiser()
    n, shape = 2, teacher.latent_shape()
    cond = teacher.image_cond(torch.rand(n, 3, *shape[1:]) * 2 - 1, 20, torch.Generator().manual_seed(0))
    x = torch.randn(n, *shape, requires_grad=True)
    feats = encoder_features(den, x, torch.tensor([10, 10]), cond)
    assert [f.shape[1] for f in feats] == unet_encoder_channels(teacher.unet)
    disc = TimeAwareDiscriminator(unet_encoder_channels(teacher.unet), 32).eval()
    logits = disc(feats, torch.tensor([10, 10]))
    logits.sum().backward()
    assert (
        x.grad is not None and x.grad.abs().sum() > 0
    )  # the generator's adversarial term reaches its output
    other = disc(encoder_features(den, x, torch.tensor([800, 800]), cond), torch.tensor([800, 800]))
    assert not torch.allclose(logits.detach(), other.detach())


def test_image_cond_is_what_the_upscale_pipeline_feeds_its_unet(tiny_teachers):
    """One UNet call of the pipeline (captured) equals the teacher denoiser's native call on ``image_cond``."""
    from PIL import Image

    from fastdiff.sr.data import from_pil
    from fastdiff.teacher import Teacher

    teacher = Teacher(tiny_teachers["sd-x4"])
    seen = {}
    hook = teacher.unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(sample=args[0], t=args[1], out=out[0], **kwargs),
        with_kwargs=True,
    )
    image = Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy())
    try:
        teacher.pipeline(prompt="", image=image, num_inference_steps=1, guidance_scale=0, noise_level=30,
                         generator=torch.Generator().manual_seed(3), output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    gen = torch.Generator().manual_seed(3)
    cond = teacher.call_cond({"prompt": "", "image": image}, {"noise_level": 30}, gen)
    latents = torch.randn(seen["sample"][:, :4].shape, generator=gen)
    assert torch.equal(cond.class_labels, torch.tensor([30]))
    assert torch.allclose(cond.unet_input(latents), seen["sample"], atol=1e-6)
    assert torch.allclose(teacher.denoiser().native(latents, seen["t"], cond), seen["out"], atol=1e-5)
    assert from_pil(image).shape == (3, 8, 8)


def test_tadsr_rejects_a_text_to_image_teacher(tiny_teachers, tmp_path):
    from fastdiff.config import load_config
    from fastdiff.run import train

    cfg = load_config(
        REPO / "assets/configs/sr_tadsr.yaml",
        [f"teacher={tiny_teachers['sd15']}", f"output_dir={tmp_path}", "max_steps=1"],
    )
    with pytest.raises(ValueError, match="StableDiffusionUpscalePipeline"):
        train(cfg)


@pytest.mark.parametrize("student", ["full", "lora"])
def test_tiny_upscaler_end_to_end_and_plain_diffusers_load(student, tiny_teachers, tmp_path, one_thread):
    """``accelerate launch`` a tiny TAD-SR run (targets made, three loss terms, discriminator), export, then the
    whole recipe in plain diffusers: ``pipe(prompt="", image=lr, num_inference_steps=1, guidance_scale=0)``."""
    from diffusers import StableDiffusionUpscalePipeline

    from fastdiff.sr.data import example_low_res

    out = tmp_path / "out"
    args = [
        "--config", str(REPO / "assets/configs/sr_tadsr.yaml"),
        f"teacher={tiny_teachers['sd-x4']}", f"output_dir={out}", "max_steps=3", "train_batch_size=2",
        "tadsr.target_items=4", "tadsr.target_steps=2", "checkpointing_steps=3", "validation_steps=3",
        f"tadsr.student={student}", f"tadsr.shared_base={'true' if student == 'lora' else 'false'}",
        "tadsr.lora_rank=4", "tadsr.lora_alpha=4",
    ]  # fmt: skip
    launch(args)
    info = json.loads((out / "fastdiff.json").read_text())
    assert info["pipeline_class"] == "StableDiffusionUpscalePipeline"
    assert (info["num_inference_steps"], info["guidance_scale"], info["noise_level"]) == (1, 0.0, 20)
    assert info["timesteps"] == [999] and info["timesteps_derivable"]
    assert info["check"]["max_abs_diff_latents"] < 1e-4
    terms = json.loads((out / "checkpoints/checkpoint-3/trainer_state.json").read_text())["last_terms"]
    assert {"student/regression", "student/hsd", "student/adversarial", "discriminator/hinge"} <= set(terms)
    if student == "lora":
        assert (out / "lora/pytorch_lora_weights.safetensors").is_file()
        assert (out / "lora/kohya_lora.safetensors").is_file()
    pipe = StableDiffusionUpscalePipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    lr = example_low_res(1, 32)[0]
    image = pipe(prompt="", image=lr, num_inference_steps=1, guidance_scale=0).images[0]
    assert image.size == (4 * lr.size[0], 4 * lr.size[1])
    if student == "lora":  # the LoRA on the teacher gives the exported pipeline's latents
        base = StableDiffusionUpscalePipeline.from_pretrained(tiny_teachers["sd-x4"])
        base.set_progress_bar_config(disable=True)
        base.load_lora_weights(out / "lora", weight_name="kohya_lora.safetensors")
        base.scheduler = pipe.scheduler
        kw = dict(prompt="", image=lr, num_inference_steps=1, guidance_scale=0, output_type="latent")
        a = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        b = base(**kw, generator=torch.Generator().manual_seed(0)).images
        assert torch.allclose(a, b, atol=1e-4)
