"""SiD's pieces against hand-computed cases: the loss and its gradient through both score networks, NaN masking,
the few-step schedule and its rank-synchronised k, the guidance variants' formulas, config errors, and the
shared-base networks on a tiny SDXL teacher."""

import pytest
import torch

from fastdiff import schedule
from fastdiff.config import ConfigError, TrainConfig, load_config
from fastdiff.methods import RunContext, build, losses
from fastdiff.methods.sid import (
    SiD,
    SiDConfig,
    draw_num_steps,
    guidance_plan,
    guided,
    replace_rows,
    step_timesteps,
)
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.gmm import scaled_linear_alphas_cumprod

ACP = scaled_linear_alphas_cumprod()


def null(n):
    return torch.full((n,), -1, dtype=torch.long)


class Affine(Denoiser):
    """x0 = a x_t + b[c]: a per-label offset (label -1 = unconditional), recording every call's labels."""

    def __init__(self, a: float, offsets: dict[int, float], nan_rows=()):
        super().__init__(ACP, "sample")
        self.a, self.offsets, self.nan_rows = a, offsets, list(nan_rows)
        self.labels = []

    def native(self, x_t, t, cond, features=False):
        self.labels.append(cond.clone())
        b = torch.tensor([self.offsets[int(c)] for c in cond], dtype=x_t.dtype)
        out = self.a * x_t + b[:, None]
        if self.nan_rows:  # as a broken network would: NaN also in the backward of those rows
            scale = torch.ones_like(out)
            scale[self.nan_rows] = float("nan")
            out = out * scale
        return out


class Constant(Denoiser):
    """A generator whose x0 is a learnable tensor, whatever its input; records (x_t, t) and the condition per call."""

    def __init__(self, value: torch.Tensor):
        super().__init__(ACP, "sample")
        self.value = torch.nn.Parameter(value.clone())
        self.calls, self.conds = [], []

    def native(self, x_t, t, cond, features=False):
        self.calls.append((x_t.detach().clone(), t.clone(), torch.is_grad_enabled()))
        self.conds.append(None if cond is None else cond.clone())
        return self.value + 0 * x_t


def make(cfg: SiDConfig, generator, fake, teacher, n=4, dim=3):
    gen_params = dict(generator.named_parameters())
    return SiD(generator, fake, teacher, cfg, (dim,), gen_params, dict(fake.named_parameters()), null)


# --- the loss ---------------------------------------------------------------------------------------------------
def test_sid_loss_is_the_card_formula_and_its_alpha_one_form():
    g = torch.Generator().manual_seed(0)
    x, y_r, y_f = (torch.randn(5, 2, 3, generator=g) for _ in range(3))
    w = (x - y_r).abs().flatten(1).mean(1)
    for alpha in (1.0, 1.2):
        expected = ((y_r - y_f) * ((y_r - x) - alpha * (y_r - y_f))).flatten(1).mean(1) / w
        torch.testing.assert_close(losses.sid_loss(x, y_r, y_f, alpha), expected)
    torch.testing.assert_close(
        losses.sid_loss(x, y_r, y_f, 1.0), ((y_r - y_f) * (y_f - x)).flatten(1).mean(1) / w
    )
    # SiD-LSG's κ3 output enters only the α term
    y_f3 = torch.randn(5, 2, 3, generator=g)
    expected = ((y_r - y_f) * ((y_r - x) - 1.2 * (y_r - y_f3))).flatten(1).mean(1) / w
    torch.testing.assert_close(losses.sid_loss(x, y_r, y_f, 1.2, x0_fake_alpha=y_f3), expected)
    # the normaliser is detached and floored
    assert not losses.mean_abs_weight(x.requires_grad_(), y_r).requires_grad
    assert losses.mean_abs_weight(y_r, y_r).min() == 1e-5


def test_generator_gradient_runs_through_both_score_networks():
    """y_r = a x_t, y_f = b x_t, x = θ: dL/dθ by hand, Jacobians of both networks included."""
    a, b, alpha, n, dim = 0.8, 0.5, 1.2, 4, 3
    theta = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    gen = Constant(theta)
    cfg = SiDConfig(guidance="cfg", guidance_scale=1.0, alpha=alpha, init_timestep=999)
    method = make(cfg, gen, Affine(b, {0: 0.0}), Affine(a, {0: 0.0}), n, dim)
    g = torch.Generator().manual_seed(3)
    loss = method.loss("generator", {"cond": torch.zeros(n, dtype=torch.long)}, 0, g)["sid"]
    loss.backward()
    # replay the draws: the generator's input noise, t, then ε
    g = torch.Generator().manual_seed(3)
    torch.randn(n, dim, generator=g)
    t = torch.randint(cfg.min_step, cfg.max_step, (n,), generator=g)
    eps = torch.randn(n, dim, generator=g)
    s_a, s_s = schedule.alpha_sigma(ACP, t, theta)
    x = theta.clone().requires_grad_()
    x_t = s_a * x + s_s * eps
    y_r, y_f = a * x_t, b * x_t
    w = (x - y_r).abs().mean(1, keepdim=True).detach()
    ((y_r - y_f) * ((y_r - x) - alpha * (y_r - y_f)) / w).mean().backward()
    torch.testing.assert_close(gen.value.grad, x.grad)
    # ... and it is not the stop-gradient (DMD-style) gradient
    x2 = theta.clone().requires_grad_()
    yr, yf = (a * x_t).detach(), (b * x_t).detach()
    ((yr - yf) * ((yr - x2) - alpha * (yr - yf)) / w).mean().backward()
    assert (gen.value.grad - x2.grad).abs().max() > 1e-3


def test_snr_weighting_divides_by_sigma_t():
    n, dim = 6, 2
    theta = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    cfg = SiDConfig(guidance="cfg", guidance_scale=1.0, weighting="snr", init_timestep=999)
    method = make(cfg, Constant(theta), Affine(0.5, {0: 0.1}), Affine(0.9, {0: -0.2}), n, dim)
    loss = method.loss(
        "generator", {"cond": torch.zeros(n, dtype=torch.long)}, 0, torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    torch.randn(n, dim, generator=g)
    t = torch.randint(cfg.min_step, cfg.max_step, (n,), generator=g)
    x_t = schedule.add_noise(theta, torch.randn(n, dim, generator=g), t, ACP)
    y_r, y_f = 0.9 * x_t - 0.2, 0.5 * x_t + 0.1
    sigma = (1 - ACP[t]).sqrt()
    torch.testing.assert_close(sigma, (1 + schedule.snr(ACP, t)).rsqrt())
    expected = ((y_r - y_f) * (y_f - theta)).mean(1) / sigma
    torch.testing.assert_close(loss["sid"], expected.mean())


def test_nan_samples_leave_the_loss_and_their_gradient():
    n, dim = 5, 3
    theta = torch.randn(n, dim, generator=torch.Generator().manual_seed(2))
    cfg = SiDConfig(guidance="cfg", guidance_scale=1.0, init_timestep=999)
    batch = {"cond": torch.zeros(n, dtype=torch.long)}

    def run(teacher, keep):
        gen = Constant(theta)
        method = make(cfg, gen, Affine(0.5, {0: 0.0}), teacher, n, dim)
        loss = method.loss("generator", batch, 0, torch.Generator().manual_seed(4))["sid"]
        loss.backward()
        return loss, gen.value.grad

    loss_nan, grad_nan = run(Affine(0.9, {0: 0.3}, nan_rows=[1]), None)
    assert torch.isfinite(loss_nan) and torch.isfinite(grad_nan).all()
    assert (grad_nan[1] == 0).all()
    # the same draws without the NaN: the loss is the mean over the other four samples
    gen = Constant(theta)
    method = make(cfg, gen, Affine(0.5, {0: 0.0}), Affine(0.9, {0: 0.3}), n, dim)
    method.loss("generator", batch, 0, torch.Generator().manual_seed(4))["sid"].backward()
    g = torch.Generator().manual_seed(4)
    torch.randn(n, dim, generator=g)
    t = torch.randint(cfg.min_step, cfg.max_step, (n,), generator=g)
    x_t = schedule.add_noise(theta, torch.randn(n, dim, generator=g), t, ACP)
    y_r, y_f = 0.9 * x_t + 0.3, 0.5 * x_t
    per = ((y_r - y_f) * (y_f - theta)).mean(1) / (theta - y_r).abs().mean(1)
    keep = torch.tensor([True, False, True, True, True])
    torch.testing.assert_close(loss_nan, per[keep].mean())
    torch.testing.assert_close(grad_nan[keep], gen.value.grad[keep] * n / 4)


def test_fake_score_skips_non_finite_generator_samples():
    n, dim = 4, 2
    theta = torch.randn(n, dim)
    theta[2] = float("nan")
    fake = Affine(0.5, {0: 0.0, -1: 0.0})
    method = make(
        SiDConfig(guidance="cfg", init_timestep=999), Constant(theta), fake, Affine(0.9, {0: 0.0}), n, dim
    )
    terms = method.loss(
        "critic", {"cond": torch.zeros(n, dtype=torch.long)}, 0, torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(terms["fake_dsm"]) and fake.labels[-1].shape == (3,)


# --- few-step: the grid, the synchronised k, fresh noise, gradient through the last step -------------------------
def test_k_step_grids_are_lcm_timesteps_with_original_inference_steps_1000():
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_schedule="scaled_linear", original_inference_steps=1000)
    for k in range(1, 9):
        sched.set_timesteps(k)
        assert step_timesteps(k, 999) == sched.timesteps.tolist()
    assert step_timesteps(4, 999) == [999, 749, 499, 249] and step_timesteps(1, 625) == [625]
    with pytest.raises(ValueError, match="number of steps"):
        step_timesteps(0, 999)


def test_k_is_a_function_of_the_step_and_uniform_over_1_to_K():
    draws = [draw_num_steps(s, 4, seed=7) for s in range(2000)]
    assert draws == [draw_num_steps(s, 4, seed=7) for s in range(2000)]  # what every rank computes
    counts = torch.bincount(torch.tensor(draws), minlength=5)[1:].float() / len(draws)
    assert counts.min() > 0.21 and counts.max() < 0.29
    assert draws != [draw_num_steps(s, 4, seed=8) for s in range(2000)]


def test_ranks_train_the_same_k_with_fresh_noise_and_gradient_through_the_last_step_only():
    n, dim = 3, 2
    cfg = SiDConfig(guidance="cfg", guidance_scale=1.0, num_steps=4, init_timestep=999)
    step = next(s for s in range(100) if draw_num_steps(s, 4) == 3)
    theta = torch.randn(n, dim)
    inputs = []
    for rank_seed in (11, 12):  # two ranks: different per-rank generators, the same step
        gen = Constant(theta)
        method = make(cfg, gen, Affine(0.5, {0: 0.0}), Affine(0.9, {0: 0.0}), n, dim)
        method.loss(
            "generator",
            {"cond": torch.zeros(n, dtype=torch.long)},
            step,
            torch.Generator().manual_seed(rank_seed),
        )
        assert [int(c[1][0]) for c in gen.calls] == [999, 666, 333]  # k = 3 on its own grid
        assert [c[2] for c in gen.calls] == [False, False, True]  # gradient only through the last step
        # replay: the initial noise, then fresh noise for each re-noising (x0 = θ at every step)
        g = torch.Generator().manual_seed(rank_seed)
        z = torch.randn(n, dim, generator=g)
        x1 = schedule.add_noise(theta, torch.randn(n, dim, generator=g), torch.full((n,), 666), ACP)
        x2 = schedule.add_noise(theta, torch.randn(n, dim, generator=g), torch.full((n,), 333), ACP)
        for (x_in, _, _), want in zip(gen.calls, (z, x1, x2)):
            torch.testing.assert_close(x_in, want)
        assert not torch.allclose(x2, schedule.add_noise(theta, z, torch.full((n,), 333), ACP))
        inputs.append(z)
    assert not torch.allclose(*inputs)  # ranks draw different noise but train the same k


def test_generate_runs_any_k_on_its_grid():
    gen = Constant(torch.zeros(2, 3))
    method = make(SiDConfig(guidance="cfg", num_steps=4, init_timestep=999), gen, gen, gen, 2, 3)
    assert method.timesteps_by_steps == {k: step_timesteps(k, 999) for k in (1, 2, 3, 4)}
    for k in (1, 2, 3, 4):
        gen.calls.clear()
        method.generate(torch.randn(2, 3), None, timesteps=k)
        assert [int(c[1][0]) for c in gen.calls] == step_timesteps(k, 999)
    gen.calls.clear()
    method.generate(torch.randn(2, 3), None)
    assert [int(c[1][0]) for c in gen.calls] == [999, 749, 499, 249]


def test_export_schedulers_derive_every_k_and_refuse_other_counts():
    """The saved scheduler derives the K-step grid and refuses more steps before sampling; each k's recipe has a
    scheduler deriving its own grid; one step at t != 999 is LCM counting t + 1 timesteps on the teacher's betas,
    whose step returns the x0 prediction at t."""
    from diffusers import LCMScheduler

    from fastdiff.recipe import derive_scheduler, make_scheduler

    config = dict(LCMScheduler(beta_schedule="scaled_linear").config)
    grids = {k: step_timesteps(k, 999) for k in (1, 2, 3, 4)}
    name, kwargs, ok = derive_scheduler(config, grids[4], "lcm")
    sched = make_scheduler(config, name, kwargs)
    sched.set_timesteps(4)
    assert ok and sched.timesteps.tolist() == grids[4]
    with pytest.raises(ValueError):
        sched.set_timesteps(5)
    for k, grid in grids.items():
        name, kwargs, ok = derive_scheduler(config, grid, "lcm")
        sched = make_scheduler(config, name, kwargs)
        sched.set_timesteps(k)
        assert ok and sched.timesteps.tolist() == grid
    name, kwargs, ok = derive_scheduler(config, [625], "lcm")
    one = make_scheduler(config, name, kwargs)
    one.set_timesteps(1)
    assert ok and one.timesteps.tolist() == [625]
    assert torch.equal(one.alphas_cumprod, LCMScheduler(**config).alphas_cumprod)
    with pytest.raises(ValueError):
        one.set_timesteps(2)
    x, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
    a = one.alphas_cumprod[625]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(one.step(eps, 625, x).prev_sample, x0, atol=1e-6, rtol=0)


# --- guidance variants ------------------------------------------------------------------------------------------
def test_guided_combines_one_batched_call():
    net = Affine(0.0, {-1: 2.0, 0: 5.0})
    x, t, c = torch.zeros(3, 1), torch.tensor([10, 20, 30]), torch.zeros(3, dtype=torch.long)
    c1, u, k = guided(net, x, t, c, (1.0, 0.0, 2.5), null)
    assert len(net.labels) == 1 and net.labels[0].tolist() == [-1, -1, -1, 0, 0, 0]
    assert (c1 == 5).all() and (u == 2).all() and (k == 2 + 2.5 * 3).all()
    net.labels.clear()
    (only_u,) = guided(net, x, t, c, (0.0,), null)
    assert net.labels[0].tolist() == [-1, -1, -1] and (only_u == 2).all()
    net.labels.clear()
    (only_c,) = guided(net, x, t, c, (1.0,), null)
    assert net.labels[0].tolist() == [0, 0, 0] and (only_c == 5).all()


@pytest.mark.parametrize(
    "guidance, extra, real, fake, fake_alpha",
    [
        # teacher: 2 (∅), 5 (c); fake: 1 (∅), 3 (c)
        ("cfg", {"guidance_scale": 4.0}, 2 + 4.0 * 3, 3.0, 3.0),
        ("lsg", {"guidance_scale": 1.5}, 2 + 1.5 * 3, 1 + 1.5 * 2, 1 + 1.5 * 2),
        ("lsg", {"lsg_scales": [2.0, 3.0, 1.5, 4.5]}, 2 + 4.5 * 3, 1 + 3.0 * 2, 1 + 1.5 * 2),
        ("zero_cfg", {"guidance_scale": 4.0}, 5.0, 1.0, 1.0),
        ("anti_cfg", {"anti_cfg_scale": -0.25}, 5.0, 3 - 0.25 * 2, 3 - 0.25 * 2),
    ],
)
def test_guidance_variants_use_the_card_scales(guidance, extra, real, fake, fake_alpha):
    n, dim, alpha = 4, 2, 1.2
    theta = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    teacher, fake_net = Affine(0.0, {-1: 2.0, 0: 5.0}), Affine(0.0, {-1: 1.0, 0: 3.0})
    cfg = SiDConfig(guidance=guidance, alpha=alpha, init_timestep=999, **extra)
    method = make(cfg, Constant(theta), fake_net, teacher, n, dim)
    loss = method.loss("generator", {"cond": torch.zeros(n, dtype=torch.long)}, 0, torch.Generator())
    per = (real - fake) * ((real - theta) - alpha * (real - fake_alpha))
    expected = (per.mean(1) / (theta - real).abs().mean(1)).mean()
    torch.testing.assert_close(loss["sid"], expected)
    if guidance == "zero_cfg":
        assert all((labels == -1).all() for labels in fake_net.labels)  # the fake never sees the prompt
    if guidance == "cfg":
        assert all((labels == 0).all() for labels in fake_net.labels)


@pytest.mark.parametrize(
    "guidance, dropout_expected", [("cfg", 0.0), ("lsg", 0.1), ("zero_cfg", None), ("anti_cfg", 0.1)]
)
def test_fake_score_training_prompts_and_its_own_cfg(guidance, dropout_expected):
    n = 4000
    fake = Affine(0.0, {-1: 1.0, 0: 3.0})
    cfg = SiDConfig(guidance=guidance, guidance_scale=2.0, init_timestep=999, anti_cfg_scale=-0.5)
    method = make(cfg, Constant(torch.zeros(n, 1)), fake, Affine(0.0, {-1: 0.0, 0: 0.0}), n, 1)
    method.loss("critic", {"cond": torch.zeros(n, dtype=torch.long)}, 0, torch.Generator().manual_seed(0))
    (labels,) = fake.labels
    plan = guidance_plan(cfg)
    if dropout_expected is None:  # Zero-CFG: unconditional only
        assert (labels == -1).all() and plan.fake_train == 0
        return
    if plan.fake_train == 1:  # one conditional pass, with dropped prompts
        dropped = (labels == -1).float().mean().item()
    else:  # LSG: [∅; c'] in one batched call, κ1 = 2
        assert labels.shape == (2 * n,) and (labels[:n] == -1).all() and plan.fake_train == 2.0
        dropped = (labels[n:] == -1).float().mean().item()
    assert dropped == pytest.approx(dropout_expected, abs=0.015)


def _critic_prompts(n=4000, steps=(0,), **changes):
    """The labels the generator sampled with and the labels the fake score trained on, per critic update."""
    gen, fake = Constant(torch.zeros(n, 1)), Affine(0.0, {-1: 1.0, 0: 3.0})
    cfg = SiDConfig(init_timestep=999, **changes)
    method = make(cfg, gen, fake, Affine(0.0, {-1: 0.0, 0: 0.0}), n, 1)
    out = []
    for step in steps:
        gen.conds.clear(), fake.labels.clear()
        g = torch.Generator().manual_seed(100 + step)
        method.loss("critic", {"cond": torch.zeros(n, dtype=torch.long)}, step, g)
        (sampled,), (trained,) = gen.conds, fake.labels
        if trained.shape[0] == 2 * n:  # [∅; c'] in one batched call (the fake's own CFG κ1 != 1)
            assert (trained[:n] == -1).all()
            trained = trained[n:]
        out.append((sampled, trained))
    return out


@pytest.mark.parametrize(
    "guidance, extra",
    [
        ("lsg", {"guidance_scale": 2.0}),
        ("lsg", {"lsg_scales": [1.0, 1.5, 1.0, 3.0]}),
        ("anti_cfg", {"prompt_dropout_mode": "reference"}),
    ],
)
def test_reference_dropout_empties_the_prompt_before_the_generator_samples(guidance, extra):
    """SiD-LSG's loop: a dropped row is sampled by G with ∅ and the fake score trains on it with ∅."""
    ((sampled, trained),) = _critic_prompts(guidance=guidance, **extra)
    assert (sampled == trained).all()
    assert (sampled == -1).float().mean().item() == pytest.approx(0.1, abs=0.015)


@pytest.mark.parametrize(
    "guidance, extra",
    [("lsg", {"guidance_scale": 2.0, "prompt_dropout_mode": "fake_only"}), ("anti_cfg", {})],
)
def test_fake_only_dropout_samples_with_the_full_prompt(guidance, extra):
    """The other mode (and Anti-CFG's default): f_ψ(·|∅) learns the generator's marginal over prompts."""
    ((sampled, trained),) = _critic_prompts(guidance=guidance, **extra)
    assert (sampled == 0).all()
    assert (trained == -1).float().mean().item() == pytest.approx(0.1, abs=0.015)


def test_auto_dropout_mode_is_reference_for_lsg_and_fake_only_for_anti_cfg():
    assert guidance_plan(SiDConfig(guidance="lsg")).sample_dropped
    assert not guidance_plan(SiDConfig(guidance="anti_cfg")).sample_dropped
    assert SiDConfig().prompt_dropout_mode == "auto"


@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 4.5]])
def test_reference_dropout_is_off_when_the_fake_scores_scales_are_all_one(scales):
    """The reference drops prompts only when the fake score's unconditional output is used (κ1, κ2, κ3)."""
    ((sampled, trained),) = _critic_prompts(guidance="lsg", lsg_scales=scales)
    assert (sampled == 0).all() and (trained == 0).all()
    assert guidance_plan(SiDConfig(guidance="lsg", lsg_scales=scales)).prompt_dropout == 0
    fake_only = SiDConfig(guidance="lsg", lsg_scales=scales, prompt_dropout_mode="fake_only")
    assert guidance_plan(fake_only).prompt_dropout == 0.1


def test_dropped_rows_are_a_function_of_the_steps_generator():
    first = _critic_prompts(n=64, steps=(0, 1), guidance="lsg", guidance_scale=2.0)
    again = _critic_prompts(n=64, steps=(0, 1), guidance="lsg", guidance_scale=2.0)
    for (a, _), (b, _) in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0][0], first[1][0])


def test_replace_rows_on_labels_and_cond():
    from fastdiff.models.denoiser import Cond

    mask = torch.tensor([True, False])
    assert replace_rows(torch.tensor([3, 4]), null(2), mask).tolist() == [-1, 4]
    c = Cond(torch.ones(2, 3, 4), torch.ones(2, 5), torch.ones(2, 6))
    z = Cond(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.full((2, 6), 7.0))
    out = replace_rows(c, z, mask)
    assert out.prompt_embeds[0].eq(0).all() and out.prompt_embeds[1].eq(1).all()
    assert out.pooled[0].eq(0).all() and out.time_ids[0].eq(7).all() and out.time_ids[1].eq(1).all()


# --- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"guidance": "pag"}, "sid.guidance must be one of"),
        ({"guidance": "anti_cfg", "anti_cfg_scale": 0.5}, r"anti_cfg_scale must be in \(-1, 0\)"),
        ({"guidance": "anti_cfg", "anti_cfg_scale": -1.0}, r"anti_cfg_scale must be in \(-1, 0\)"),
        ({"guidance": "lsg", "lsg_scales": [1.0, 2.0]}, "lsg_scales must list"),
        ({"weighting": "edm"}, "sid.weighting must be one of"),
        ({"prompt_dropout": 1.0}, "prompt_dropout"),
        ({"prompt_dropout_mode": "generator"}, "prompt_dropout_mode must be one of"),
        ({"min_step": 600, "max_step": 500}, "min_step < sid.max_step"),
        ({"init_timestep": 1000}, "init_timestep"),
        ({"num_steps": 0}, "num_steps"),
    ],
)
def test_bad_sid_config_is_a_clear_error(changes, match):
    gen = Constant(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=match):
        make(SiDConfig(**changes), gen, gen, gen, 1, 1)


def test_sid_config_section_and_build_errors():
    cfg = load_config(None, ["teacher=x", "method=sid", "sid.guidance=zero_cfg", "sid.num_steps=4"])
    assert isinstance(cfg.section, SiDConfig)
    assert cfg.section.guidance == "zero_cfg" and cfg.section.num_steps == 4
    with pytest.raises(ConfigError, match="sid.kappa"):
        load_config(None, ["teacher=x", "method=sid", "sid.kappa=2"])

    def context(section: SiDConfig) -> RunContext:
        run = TrainConfig(method="sid", teacher="x")
        run.section = section
        return RunContext(None, section, run, 64, (4, 8, 8), with_real_data=False)

    with pytest.raises(ValueError, match="sid.gan=on needs real images"):
        build(context(SiDConfig(gan="on")))
    with pytest.raises(ValueError, match="sid.gan must be"):
        build(context(SiDConfig(gan="maybe")))


@pytest.mark.parametrize("recipe", ["sd15_sid_lsg", "sdxl_sid_1step", "sdxl_sid_4step"])
def test_large_recipes_keep_the_references_ema_half_life(recipe):
    """SiD-LSG's --ema 0.05: a half-life of 50k images, a decay of 0.5 ** (global batch / 50k) per step."""
    from fastdiff.paths import asset

    cfg = load_config(str(asset("configs", f"{recipe}.yaml")), ["teacher=x"])
    batch = cfg.train_batch_size * cfg.gradient_accumulation_steps
    assert cfg.section.ema_decay == pytest.approx(0.5 ** (batch / 50_000), rel=0, abs=1e-8)
    assert cfg.section.prompt_dropout_mode == "reference"
    gen = Constant(torch.zeros(1, 1))
    groups = {g.name: g for g in make(cfg.section, gen, gen, gen, 1, 1).groups()}
    assert groups["generator"].ema_decay == cfg.section.ema_decay and groups["critic"].ema_decay is None


# --- a tiny SDXL teacher: shared base, gradients, the GAN head --------------------------------------------------
def test_shared_base_sid_on_a_tiny_sdxl_teacher(tiny_teachers):
    from fastdiff.models.lora import unique_parameter_bytes
    from fastdiff.teacher import Teacher

    t = Teacher(tiny_teachers["sdxl"])
    cfg = SiDConfig(
        generator="lora",
        fake_score="lora",
        shared_base=True,
        lora_rank=4,
        lora_alpha=4,
        num_steps=2,
        init_timestep=999,
        guidance="lsg",
    )
    method = SiD.from_teacher(t, cfg, t.latent_shape(), with_gan=True)
    assert method.generator.unet is method.fake_score.unet is t.unet
    assert unique_parameter_bytes(method) < 1.5 * unique_parameter_bytes(t.unet) + unique_parameter_bytes(
        method.critic.head
    )
    groups = {g.name: g for g in method.groups()}
    assert (
        list(groups) == ["critic", "generator"]
        and groups["critic"].interval == groups["generator"].interval == 1
    )
    batch = {"cond": t.encode(["a", "b"]), "real": torch.randn(2, *t.latent_shape())}
    for name in ("critic", "generator"):
        for g in groups.values():
            for p in g.params.values():
                p.requires_grad_(g.name == name)  # as the trainer does
                p.grad = None
        terms = method.loss(name, batch, 0, torch.Generator().manual_seed(0))
        sum(terms.values()).backward()
        assert set(terms) == ({"fake_dsm", "gan_d"} if name == "critic" else {"sid", "gan_g"})
        grads = [p.grad for p in groups[name].params.values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        other = "generator" if name == "critic" else "critic"
        assert all(p.grad is None for p in groups[other].params.values())
