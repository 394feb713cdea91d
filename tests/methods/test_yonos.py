"""YONOS-SR: the distillation target is the x2 teacher's x0 at the same z_t (by hand from raw UNet calls), the
ground-truth target is the x4 teacher's own training loss, the x2 conditioning is the x2 image space-to-depth, the
student moves toward the teacher, the decoder stage touches only the decoder, the scale chain and config checks."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdiff.config import ConfigError, load_config
from fastdiff.methods.yonos import YONOS, YONOSConfig
from fastdiff.methods.yonos.method import check_config, make_batch
from fastdiff.methods.yonos.perceptual import VGGPerceptual

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "assets/configs/sr_yonos.yaml"


@pytest.fixture(scope="module")
def tiny_x2(tiny_teachers, tmp_path_factory):
    """An (untrained) x2 scale teacher on the tiny x4 teacher: its UNet widened, its VAE and schedule shared."""
    from fastdiff.sr.teacher import init_scale_teacher

    return str(init_scale_teacher(tiny_teachers["sd-x4"], tmp_path_factory.mktemp("x2") / "x2"))


def _method(tiny_teachers, tiny_x2, tmp_path, *overrides) -> YONOS:
    from fastdiff.run import run_context
    from fastdiff.teacher import Teacher

    cfg = load_config(RECIPE, [f"teacher={tiny_teachers['sd-x4']}", f"yonos.scale_teachers=[{tiny_x2}]",
                               f"output_dir={tmp_path}", "resolution=32", "max_steps=10", "yonos.decoder_steps=0",
                               *overrides])  # fmt: skip
    teacher = Teacher(cfg.teacher)
    return YONOS.build(run_context(cfg, teacher, with_data=False)), teacher


def _batch(teacher, n=2, seed=0):
    from fastdiff.sr.data import random_pairs

    g = torch.Generator().manual_seed(seed)
    hr = random_pairs(n, g, "train", 32).hr
    return make_batch(hr, g, teacher.encode_images)


@torch.no_grad()
def _by_hand(method, teacher, tiny_x2, batch):
    """(student v, teacher x0, z_t, α, σ) from the raw UNets, conditioned as the pipelines condition them."""
    from fastdiff.sr.teacher import load_scale_teacher

    acp = teacher.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
    a, s = acp.sqrt(), (1 - acp).sqrt()
    z_t = a * batch["latents"] + s * batch["noise"]
    n = z_t.shape[0]
    prompt = teacher.pipeline.encode_prompt([""] * n, "cpu", 1, False)[0]
    low = teacher.pipeline.low_res_scheduler
    lr4 = low.add_noise(batch["low_res"], batch["low_res_noise"], torch.full((n,), 20))
    v_student = method.net.unet(torch.cat([z_t, lr4], 1), batch["timesteps"], encoder_hidden_states=prompt,
                                class_labels=torch.full((n,), 20)).sample  # fmt: skip
    x2 = load_scale_teacher(tiny_x2)
    lr2 = low.add_noise(batch["low_res_x2"], batch["low_res_x2_noise"], torch.full((n,), 0))
    v_teacher = x2.unet(torch.cat([z_t, F.pixel_unshuffle(lr2, 2)], 1), batch["timesteps"],
                        encoder_hidden_states=prompt, class_labels=torch.zeros(n, dtype=torch.long)).sample  # fmt: skip
    return v_student, a * z_t - s * v_teacher, z_t, a, s


def test_the_target_is_the_x2_teachers_x0_at_the_same_noisy_latent(tiny_teachers, tiny_x2, tmp_path):
    method, teacher = _method(tiny_teachers, tiny_x2, tmp_path)
    batch = _batch(teacher)
    v_student, x0_teacher, z_t, a, s = _by_hand(method, teacher, tiny_x2, batch)
    # the target's x0 is the scale teacher's at z_t, read in the student's parametrisation (v): (α z_t - x0) / σ
    y = method.target_x0(batch, z_t, batch["timesteps"])
    torch.testing.assert_close(y, x0_teacher, rtol=1e-4, atol=1e-5)
    expected = (v_student - (a * z_t - x0_teacher) / s).square().mean()
    loss = method.loss("student", batch, 0, torch.Generator())
    assert set(loss) == {"distill"}
    torch.testing.assert_close(loss["distill"], expected, rtol=1e-4, atol=1e-6)
    # mix: the same with y = (1 - w) teacher + w z0
    mixed, _ = _method(tiny_teachers, tiny_x2, tmp_path, "yonos.target=mix", "yonos.gt_weight=0.25")
    mixed.net.unet.load_state_dict(method.net.unet.state_dict())
    y_mix = 0.75 * x0_teacher + 0.25 * batch["latents"]
    expected = (v_student - (a * z_t - y_mix) / s).square().mean()
    torch.testing.assert_close(
        mixed.loss("student", batch, 0, None)["distill"], expected, rtol=1e-4, atol=1e-6
    )


def test_ground_truth_target_is_the_plain_x4_regression(tiny_teachers, tiny_x2, tmp_path):
    """target=ground_truth is the x4 teacher's own training loss: v-MSE against α ε - σ z0."""
    method, teacher = _method(tiny_teachers, tiny_x2, tmp_path, "yonos.target=ground_truth")
    batch = _batch(teacher, seed=1)
    v_student, _, _, a, s = _by_hand(method, teacher, tiny_x2, batch)
    expected = (v_student - (a * batch["noise"] - s * batch["latents"])).square().mean()
    torch.testing.assert_close(
        method.loss("student", batch, 0, None)["distill"], expected, rtol=1e-4, atol=1e-6
    )


def test_the_x2_conditioning_is_pixel_unshuffle_of_the_x2_image(tiny_teachers, tiny_x2, tmp_path):
    from fastdiff.methods.yonos.method import load_scale_denoiser

    method, teacher = _method(tiny_teachers, tiny_x2, tmp_path)
    batch = _batch(teacher, n=3)
    hr = batch["hr"]
    assert torch.equal(batch["low_res_x2"], F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True)
                       .clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1))  # fmt: skip
    cond = load_scale_denoiser(tiny_x2, teacher, [2, 4]).cond(batch["low_res_x2"], batch["low_res_x2_noise"])
    noised = teacher.pipeline.low_res_scheduler.add_noise(
        batch["low_res_x2"], batch["low_res_x2_noise"], torch.zeros(3, dtype=torch.long)
    )
    assert cond.image.shape == (3, 12, 8, 8) and torch.equal(cond.image, F.pixel_unshuffle(noised, 2))
    assert torch.equal(cond.image[:, 4 * 2 + 2 * 1 + 0], noised[:, 2, 1::2, 0::2])  # colour 2, pixel (1, 0)
    assert torch.equal(cond.class_labels, torch.zeros(3, dtype=torch.long))  # the x2 teacher's noise level


def test_the_student_moves_toward_the_teacher(tiny_teachers, tiny_x2, tmp_path):
    torch.manual_seed(0)
    method, teacher = _method(tiny_teachers, tiny_x2, tmp_path, "yonos.t_range=[400,999]")
    (group,) = method.groups()
    opt = torch.optim.Adam(group.params.values(), lr=3e-4)
    batch = _batch(teacher, n=4, seed=2)
    losses = []
    for _ in range(8):
        loss = method.loss("student", batch, 0, None)["distill"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not p.requires_grad for p in method.scale_teacher.parameters())  # the teacher is frozen


def test_the_decoder_stage_trains_only_the_decoder(tiny_teachers, tiny_x2, tmp_path):
    method, teacher = _method(tiny_teachers, tiny_x2, tmp_path, "yonos.decoder_steps=4")
    student, decoder = method.groups()
    assert [student.updates_at(s) for s in (0, 5, 6)] == [True, True, False]
    assert [decoder.updates_at(s) for s in (5, 6, 9)] == [False, True, True]
    assert student.num_updates(10) == 6 and decoder.num_updates(10) == 4
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in decoder.params)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    assert not method.decoder_tuned()  # the teacher's decoder until stage 2 moves it
    for p in decoder.params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(decoder.params.values(), lr=1e-2)
    terms = method.loss("decoder", _batch(teacher, seed=3), 6, None)
    assert set(terms) == {"l1"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in method.net.parameters())  # the one-step UNet is frozen in stage 2
    opt.step()
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in changed), changed
    assert not any(k.startswith(("vae.encoder.", "vae.quant_conv.", "net.")) for k in changed)
    assert (
        method.decoder_tuned()
        and method.recipe(dict(teacher.pipeline.scheduler.config)).extra["decoder_tuned"]
    )


def test_perceptual_term_from_a_local_vgg_file(tmp_path):
    model = VGGPerceptual()
    torch.save({f"features.{k}": v for k, v in model.features.state_dict().items()}, tmp_path / "vgg.pth")
    loaded = VGGPerceptual.from_file(tmp_path / "vgg.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded(x, x).item() == 0 and loaded(x, x.flip(-1)).item() > 0
    with pytest.raises(FileNotFoundError):
        VGGPerceptual.from_file(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VGG16"):
        VGGPerceptual.from_file(tmp_path / "bad.pth")


def test_config_checks():
    check_config(YONOSConfig(), 100)
    with pytest.raises(ConfigError, match=r"only the step \[2, 4\]"):
        check_config(YONOSConfig(scales=[2, 4, 8], scale_teachers=["a", "b"]))
    with pytest.raises(ConfigError, match="target"):
        check_config(YONOSConfig(target="teachers"))
    with pytest.raises(ConfigError, match="no scale-distillation steps"):
        check_config(YONOSConfig(decoder_steps=10), 10)
    with pytest.raises(ConfigError, match="ema_decay"):
        check_config(YONOSConfig(decoder_steps=1, ema_decay=0.99), 10)
    with pytest.raises(ConfigError, match="one teacher folder per scale"):
        check_config(YONOSConfig(scale_teachers=[]))


def test_a_missing_or_mismatched_scale_teacher_is_a_clear_error(tiny_teachers, tiny_x2, tmp_path):
    import json
    import shutil

    with pytest.raises(ConfigError, match="train the x2 teacher"):
        _method(tiny_teachers, str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(ValueError, match="not a scale teacher"):
        _method(tiny_teachers, tiny_teachers["sd-x4"], tmp_path)
    other = tmp_path / "other"
    shutil.copytree(tiny_x2, other)
    info = json.loads((other / "fastdiff_teacher.json").read_text())
    (other / "fastdiff_teacher.json").write_text(json.dumps({**info, "base": tiny_teachers["sd-x4"]}))
    sched = json.loads((other / "scheduler/scheduler_config.json").read_text())
    (other / "scheduler/scheduler_config.json").write_text(json.dumps({**sched, "beta_end": 0.02}))
    with pytest.raises(ConfigError, match="noise schedule"):
        _method(tiny_teachers, str(other), tmp_path)


def test_the_shipped_x2_teacher_shares_the_x4_teachers_latents_and_schedule(caplog):
    from fastdiff.methods.yonos.method import load_scale_denoiser
    from fastdiff.sr.teacher import load_scale_teacher
    from fastdiff.teacher import Teacher

    shipped = REPO / "assets/teachers/sr-x2"
    st = load_scale_teacher(shipped)
    assert st.base == (REPO / "assets/teachers/sr-x4").resolve() and st.unet.config.in_channels == 16
    assert (
        st.info["stats"]["evaluate"]["teacher"]["psnr_y_image"]
        > st.info["stats"]["evaluate"]["init_from"]["psnr_y_image"]
    )
    with caplog.at_level("WARNING", logger="fastdiff"):
        load_scale_denoiser("assets/teachers/sr-x2", Teacher(REPO / "assets/teachers/sr-x4"), [2, 4])
    assert not [r for r in caplog.records if "latent space" in r.getMessage()]
