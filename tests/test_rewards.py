"""Reward models: they score what they claim, pass gradients to the latents, and resolve by name."""

from __future__ import annotations

import json

import pytest
import torch

from fastdiff.demo import DIGITS_TEACHER
from fastdiff.digits.data import load_split, prompt_for
from fastdiff.methods.tscd.reward import build_reward
from fastdiff.teacher import Teacher


@pytest.fixture(scope="module")
def digits_teacher():
    return Teacher(str(DIGITS_TEACHER))


@pytest.fixture(scope="module")
def real_latents(digits_teacher):
    images, labels = load_split("test")
    images, labels = images[:40], labels[:40]
    latents = digits_teacher.encode_images(images * 2 - 1, generator=torch.Generator().manual_seed(0))
    return latents, labels.tolist()


def test_digits_reward_prefers_the_prompted_digit(digits_teacher, real_latents):
    reward = build_reward(
        "auto", digits_teacher
    )  # the bundled digits teacher resolves to the digit classifier
    latents, labels = real_latents
    right = reward(latents, {"prompts": [prompt_for(y) for y in labels]})
    wrong = reward(latents, {"prompts": [prompt_for((y + 3) % 10) for y in labels]})
    assert right.ndim == 0 and right > -0.5 > wrong  # log p(right digit) near 0, wrong digit far below


def test_digits_reward_gradient_ascent_raises_the_reward(digits_teacher, real_latents):
    reward = build_reward("digits", digits_teacher)
    latents, labels = real_latents
    batch = {"prompts": [prompt_for((y + 1) % 10) for y in labels[:8]]}  # ask for another digit
    x = latents[:8].clone().requires_grad_(True)
    before = reward(x, batch)
    before.backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        x += 0.5 * x.grad / x.grad.norm()
    assert reward(x, batch) > before


def test_digits_reward_ignores_prompts_without_a_digit(digits_teacher, real_latents):
    reward = build_reward("digits", digits_teacher)
    latents, labels = real_latents
    mixed = reward(latents[:4], {"prompts": ["", prompt_for(labels[1]), "", prompt_for(labels[3])]})
    only = reward(latents[[1, 3]], {"prompts": [prompt_for(labels[1]), prompt_for(labels[3])]})
    torch.testing.assert_close(mixed, only)
    assert reward(latents[:2], {"prompts": ["", ""]}) == 0


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    from fastdiff.models.tiny import make_tokenizer

    tok = make_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_clip_reward_from_a_local_folder_is_differentiable(tiny_teachers, tmp_path):
    teacher = Teacher(tiny_teachers["sdxl"])
    reward = build_reward(str(_tiny_clip(tmp_path / "clip")), teacher)
    x = torch.randn(2, *teacher.latent_shape(teacher.resolution), requires_grad=True)
    batch = {"prompts": ["a red square", "a blue circle"]}
    score = reward(x, batch)
    assert score.ndim == 0 and -1 <= float(score.detach()) <= 1
    score.backward()
    with torch.no_grad():
        step = x + 0.5 * x.grad / x.grad.norm()
    assert reward(step, batch) > score


def test_reward_names_are_checked(tiny_teachers, tmp_path):
    teacher = Teacher(tiny_teachers["sdxl"])
    with pytest.raises(ValueError, match="needs a reward model"):
        build_reward("auto", teacher)  # a teacher fastdiff did not train on digits
    with pytest.raises(FileNotFoundError, match="reward model not found"):
        build_reward(str(tmp_path / "missing"), teacher)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither a DigitClassifier nor a CLIP"):
        build_reward(str(tmp_path / "other"), teacher)


def test_tscd_reward_term_from_config(digits_teacher):
    from fastdiff.config import load_config
    from fastdiff.methods import build
    from fastdiff.run import run_context

    cfg = load_config(
        "assets/configs/digits_tscd.yaml",
        [f"teacher={DIGITS_TEACHER}", "tscd.reward_weight=0.1", "resolution=32"],
    )
    ctx = run_context(cfg, digits_teacher, with_data=False)
    ctx.with_real_data = True
    assert ctx.latent_shape == digits_teacher.latent_shape(32)
    method = build(ctx)
    images, labels = load_split("train")
    prompts = [prompt_for(int(y)) for y in labels[:4]]
    batch = {
        "cond": digits_teacher.encode(prompts, 32),
        "real": digits_teacher.encode_images(images[:4] * 2 - 1),
        "prompts": prompts,
    }
    terms = method.loss("student", batch, step=0, generator=torch.Generator().manual_seed(0))
    adversarial = {"gan_g"} if cfg.section.adversarial_weight else set()  # the recipe's adversarial term
    assert (
        set(terms) == {"cd", "reward"} | adversarial
        and torch.isfinite(terms["reward"])
        and terms["reward"] > 0
    )  # -λ log p
    sum(terms.values()).backward()
    grads = [p.grad for p in method.groups()[0].params.values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
