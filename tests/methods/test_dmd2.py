"""DMD2's pieces against hand-computed cases, and its memory modes on a tiny SDXL teacher."""

from pathlib import Path

import pytest
import torch

from fastdiff import schedule
from fastdiff.config import OptimizerConfig, load_config
from fastdiff.methods import losses
from fastdiff.methods.dmd2 import DMD2, DMD2Config
from fastdiff.models.denoiser import CFG, Denoiser
from fastdiff.models.gmm import scaled_linear_alphas_cumprod


def test_dmd_gradient_is_normalised_difference_of_scores():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    real = torch.tensor(
        [[0.0, 1.0], [0.0, 0.0]]
    )  # second sample: x == real -> weight 0 -> gradient 0, not NaN
    fake = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    g = losses.dmd_gradient(x, real, fake)
    weight = (x[0] - real[0]).abs().mean()  # 1.5
    torch.testing.assert_close(g[0], (fake[0] - real[0]) / weight)
    assert torch.isfinite(g).all()


def test_dmd_loss_gradient_moves_samples_from_fake_toward_real():
    x = torch.randn(8, 4, requires_grad=True)
    real = torch.zeros(8, 4)  # the teacher's denoiser pulls to 0
    fake = x.detach().clone()  # the fake score sits on the samples
    losses.dmd_loss(x, real, fake).backward()
    g = losses.dmd_gradient(x.detach(), real, fake)
    torch.testing.assert_close(x.grad, g / x.numel())
    step = x.detach() - 0.1 * x.grad.sign()
    assert (step.norm(dim=1) < x.detach().norm(dim=1)).all()


class Recorder(Denoiser):
    """A generator whose x0 is a fixed function of its input, recording (x_t, t) per call."""

    def __init__(self, acp):
        super().__init__(acp, "sample")
        self.calls = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def native(self, x_t, t, cond, features=False):
        self.calls.append((x_t.detach().clone(), t.clone()))
        return 0.5 * x_t * self.w


def test_backward_simulation_feeds_each_step_its_own_k_step_input():
    acp = scaled_linear_alphas_cumprod()
    gen = Recorder(acp)
    cfg = DMD2Config(student_timesteps=[999, 749, 499, 249])
    method = DMD2(gen, gen, CFG(gen, 1.0, lambda n: None), cfg, (3,), {"w": gen.w}, {})
    g = torch.Generator().manual_seed(0)
    out = method._student_sample(None, 64, g, "cpu")
    # replay the same draws: k per sample, the initial noise, then fresh noise for each simulated step
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor(cfg.student_timesteps)
    k = torch.randint(0, 4, (64,), generator=g)
    x = torch.randn(64, 3, generator=g)
    for i in range(int(k.max())):
        x0 = 0.5 * x
        eps = torch.randn(64, 3, generator=g)
        assert not torch.allclose(eps, torch.randn(64, 3, generator=torch.Generator().manual_seed(0)))
        x = torch.where((k > i)[:, None], schedule.add_noise(x0, eps, ts[i + 1].expand(64), acp), x)
    last_x, last_t = gen.calls[-1]
    torch.testing.assert_close(last_t, ts[k])
    torch.testing.assert_close(last_x, x)
    torch.testing.assert_close(out, 0.5 * x)
    assert out.requires_grad  # gradient through the last step only
    assert all(not c[0].requires_grad for c in gen.calls)
    assert len(gen.calls) == int(k.max()) + 1 and set(k.tolist()) == {0, 1, 2, 3}


def test_generate_renoises_with_fresh_noise_like_lcm():
    acp = scaled_linear_alphas_cumprod()
    gen = Recorder(acp)
    method = DMD2(gen, gen, gen, DMD2Config(student_timesteps=[999, 499]), (3,), {"w": gen.w}, {})
    noise = torch.randn(5, 3)
    g = torch.Generator().manual_seed(7)
    out = method.generate(noise, None, generator=g)
    g = torch.Generator().manual_seed(7)
    x1 = schedule.add_noise(0.5 * noise, torch.randn(5, 3, generator=g), torch.full((5,), 499), acp)
    torch.testing.assert_close(out, 0.5 * x1)


def test_shared_base_keeps_one_unet_in_memory(tiny_teachers):
    from fastdiff.models.lora import unique_parameter_bytes
    from fastdiff.teacher import Teacher

    sizes = {}
    for shared in (True, False):
        t = Teacher(tiny_teachers["sdxl"])
        kind = "lora" if shared else "full"
        cfg = DMD2Config(generator=kind, fake_score=kind, shared_base=shared, lora_rank=4, lora_alpha=4)
        method = DMD2.from_teacher(t, cfg, t.latent_shape(), with_gan=True)
        sizes[shared] = unique_parameter_bytes(method)
        unet_bytes = unique_parameter_bytes(t.unet)
        if shared:
            assert method.generator.unet is method.fake_score.unet is t.unet
            assert sizes[shared] < 1.5 * unet_bytes + unique_parameter_bytes(method.critic.head)
        else:
            assert sizes[shared] > 2.9 * unet_bytes
        # GAN head on the fake score's mid-block features gives one logit per sample
        x = torch.randn(2, *t.latent_shape())
        _, feats = method.fake_score(x, torch.tensor([10, 900]), t.encode(["a", "b"]), features=True)
        assert method.critic.head(feats).shape == (2,)
    assert sizes[True] <= 0.6 * sizes[False]


def test_shared_base_needs_a_lora_network(tiny_teachers):
    from fastdiff.teacher import Teacher

    t = Teacher(tiny_teachers["sdxl"])
    full = DMD2Config(generator="full", fake_score="full", shared_base=True)
    with pytest.raises(ValueError, match="shared_base needs a LoRA network"):
        DMD2.from_teacher(t, full, t.latent_shape(), with_gan=False)


def test_reference_layout_puts_the_generator_lora_on_the_teacher_and_keeps_a_full_fake_score(tiny_teachers):
    """The reference's 4-step LoRA recipe: LoRA generator, full fake score. With shared_base the generator's adapter
    sits on the frozen teacher UNet (the real score is that UNet with adapters disabled): two UNets in memory."""
    from fastdiff.models.lora import unique_parameter_bytes
    from fastdiff.teacher import Teacher

    t = Teacher(tiny_teachers["sdxl"])
    x, ts, cond = torch.randn(2, *t.latent_shape()), torch.tensor([10, 900]), t.encode(["a", "b"])
    with torch.no_grad():
        teacher_x0 = t.denoiser(adapter="*")(x, ts, cond)
    cfg = DMD2Config(generator="lora", fake_score="full", shared_base=True, lora_rank=4, lora_alpha=4)
    method = DMD2.from_teacher(t, cfg, t.latent_shape(), with_gan=False)
    assert method.generator.unet is t.unet and method.generator.adapter == "student"
    assert method.fake_score.unet is not t.unet and not getattr(method.fake_score.unet, "peft_config", None)
    fake_params = method.critic.params()
    assert set(fake_params) == {
        n for n, _ in method.fake_score.unet.named_parameters()
    }  # the whole fake UNet
    assert all(p.dtype == torch.float32 for p in fake_params.values())
    assert all("lora" in n for n in method.groups()[0].params)  # the generator trains its adapter only
    unet_bytes = unique_parameter_bytes(t.unet)
    assert 1.9 * unet_bytes < unique_parameter_bytes(method) < 2.3 * unet_bytes
    with torch.no_grad():  # the fake score starts as the teacher, and so does the generator (lora_B = 0)
        torch.testing.assert_close(method.fake_score(x, ts, cond), teacher_x0)
        torch.testing.assert_close(method.generator(x, ts, cond), teacher_x0)
        torch.testing.assert_close(method.real_score.base(x, ts, cond), teacher_x0)
    # a step of the generator's adapter moves the generator, not the real score or the fake copy
    with torch.no_grad():
        for p in method.groups()[0].params.values():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(method.generator(x, ts, cond), teacher_x0)
        torch.testing.assert_close(method.real_score.base(x, ts, cond), teacher_x0)
        torch.testing.assert_close(method.fake_score(x, ts, cond), teacher_x0)


RECIPES = Path(__file__).resolve().parents[2] / "assets/configs"


def test_sdxl_one_step_recipe_starts_from_a_regression_on_teacher_ode_pairs():
    cfg = load_config(RECIPES / "sdxl_dmd2_1step.yaml", ["teacher=/models/sdxl"]).section
    assert cfg.init == "regression" and cfg.regression_pairs == 10_000 and cfg.student_timesteps == [399]
    assert (
        cfg.regression_steps == 2000 * cfg.dfake_gen_update_ratio
    )  # the reference's 2,000 regression updates


def test_four_step_recipe_names_its_layout_and_offers_the_other():
    text = (RECIPES / "sdxl_dmd2_4step.yaml").read_text()
    cfg = load_config(RECIPES / "sdxl_dmd2_4step.yaml", ["teacher=/models/sdxl"]).section
    assert cfg.generator == "lora" and cfg.shared_base
    other = "lora" if cfg.fake_score == "full" else "full"
    assert f"dmd2.fake_score={other}" in text  # the override that switches to the other layout


@pytest.mark.parametrize("name", ["sdxl_dmd2_1step", "sdxl_dmd2_4step", "sd15_dmd2_1step"])
def test_dmd2_recipes_say_how_they_differ_from_the_reference(name):
    """A recipe that differs from tianweiy/DMD2 says so (batch, GPUs, steps) instead of calling itself the reference."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    assert not any("reference defaults" in line for line in comments)
    differs = [line for line in comments if "Differs from the reference" in line]
    assert differs and all(word in "\n".join(comments) for word in ("batch", "GPU", "iterations"))


def test_gan_features_stop_the_unet_after_its_mid_block(tiny_teachers):
    """mid_features equals the full forward's mid-block output, skips the decoder, and passes gradients."""
    from fastdiff.teacher import Teacher

    t = Teacher(tiny_teachers["sdxl"])
    method = DMD2.from_teacher(t, DMD2Config(shared_base=True), t.latent_shape(), with_gan=True)
    fake, unet = method.fake_score, method.fake_score.unet
    x = torch.randn(2, *t.latent_shape(), requires_grad=True)
    ts, cond = torch.tensor([10, 900]), t.encode(["a", "b"])
    _, full = fake(x, ts, cond, features=True)
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in unet.up_blocks]
    try:
        feats = fake.mid_features(x, ts, cond)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []  # no decoder block ran
    torch.testing.assert_close(feats, full)
    method.critic.head(feats).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.critic.head.parameters())
    # the adapter context was restored although the forward stopped early
    assert fake(x, ts, cond).shape == x.shape
    # the critic group holds the fake score's parameters and the head's, and D gives one logit per sample
    params = method.critic.params()
    head = {f"head.{n}" for n, _ in method.critic.head.named_parameters()}
    critic_group = method.groups()[1].params
    assert head <= set(params) and set(params) - head and set(params) == set(critic_group)
    assert all(params[n] is critic_group[n] for n in params)
    logits = method.critic.logits(x.detach(), cond, torch.Generator().manual_seed(0))
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_lr_schedule_reaches_the_groups_and_bad_values_name_the_key():
    acp = scaled_linear_alphas_cumprod()
    gen = Recorder(acp)
    optim = dict(weight_decay=0.01, warmup_steps=500, max_grad_norm=10.0)  # DMD2's own optim defaults
    cfg = DMD2Config(optim=OptimizerConfig(lr_schedule="cosine", **optim))
    groups = DMD2(gen, gen, gen, cfg, (3,), {"w": gen.w}, {}).groups()
    assert [g.lr_schedule for g in groups] == ["cosine", "cosine"]
    cfg = DMD2Config(optim=OptimizerConfig(lr_schedule="linear", **optim))
    with pytest.raises(
        ValueError, match=r"dmd2\.optim\.lr_schedule must be constant or cosine, got 'linear'"
    ):
        DMD2(gen, gen, gen, cfg, (3,), {"w": gen.w}, {}).groups()


def test_the_gmm_bench_lora_fake_score_trains_only_an_adapter_on_every_linear_layer():
    from fastdiff.eval.bench_gmm import lora_on_mlp
    from fastdiff.models.gmm import MLPDenoiser

    net = MLPDenoiser(scaled_linear_alphas_cumprod(), dim=2, num_classes=4, hidden=32, depth=3)
    x, t, c = torch.randn(5, 2), torch.randint(0, 1000, (5,)), torch.randint(0, 4, (5,))
    with torch.no_grad():
        before = net(x, t, c)
    linears = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    params = lora_on_mlp(net, 4, 1.0)
    assert len(params) == 2 * linears and all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for n, p in net.named_parameters() if n not in params)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, c), before)  # lora_B = 0: the pretrained fake score at first
