"""Uni-Instruct: the f-weights and their derivatives against hand-computed values, the tractable loss's gradient
against the exact gradient of the expanded divergence (1-D Gaussian mixtures, quadrature), the reductions to DMD2 and
SiD (identical generator gradients on a fixed batch), the density-ratio discriminator's data-free training, and a
short GMM run."""

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdiff.config import load_config
from fastdiff.methods import losses
from fastdiff.methods.dmd2 import DMD2, DMD2Config
from fastdiff.methods.sid import SiD, SiDConfig
from fastdiff.methods.uni_instruct import UniConfig, UniInstruct, divergences, expansion, tractable
from fastdiff.methods.uni_instruct.method import dmd_per_sample
from fastdiff.models.denoiser import CFG
from fastdiff.models.gmm import MLPDenoiser, scaled_linear_alphas_cumprod
from fastdiff.models.heads import DiscriminatorHead

REPO = Path(__file__).resolve().parents[2]
N, DIM, CLASSES = 16, 3, 2

# h(r) = f''(r) r² worked out by hand at r = 1/2, 1, 2 (f-distill Table 1's f, plus Pearson and Neyman χ²)
HAND = {
    "reverse_kl": (1.0, 1.0, 1.0),  # f = -log r: f'' = 1/r²
    "softened_rkl": (2 / 3, 1 / 2, 1 / 3),  # 1 / (1 + r)
    "js": (1 / 3, 1 / 2, 2 / 3),  # r / (1 + r)
    "squared_hellinger": (0.25 * math.sqrt(0.5), 0.25, 0.25 * math.sqrt(2)),  # f = 1 - √r: √r / 4
    "forward_kl": (0.5, 1.0, 2.0),  # f = r log r: f'' = 1/r
    "jeffreys": (1.5, 2.0, 3.0),  # f = (r - 1) log r: r + 1
    "pearson": (0.5, 2.0, 8.0),  # f = (r - 1)²: 2 r²
    "neyman": (4.0, 2.0, 1.0),  # f = (1 - r)² / r: 2 / r
}

# (r h'(r), r² h''(r)) by hand at r = 1/2, 1, 2
HAND_DERIVATIVES = {
    "reverse_kl": ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
    "softened_rkl": ((-2 / 9, 4 / 27), (-1 / 4, 1 / 4), (-2 / 9, 8 / 27)),  # -r/(1+r)², 2r²/(1+r)³
    "js": ((2 / 9, -4 / 27), (1 / 4, -1 / 4), (2 / 9, -8 / 27)),  # r/(1+r)², -2r²/(1+r)³
    "squared_hellinger": (
        (math.sqrt(0.5) / 8, -math.sqrt(0.5) / 16),
        (1 / 8, -1 / 16),
        (math.sqrt(2) / 8, -math.sqrt(2) / 16),
    ),  # √r/8, -√r/16
    "forward_kl": ((0.5, 0.0), (1.0, 0.0), (2.0, 0.0)),  # r, 0
    "jeffreys": ((0.5, 0.0), (1.0, 0.0), (2.0, 0.0)),  # r, 0
    "pearson": ((1.0, 1.0), (4.0, 4.0), (16.0, 16.0)),  # 4r², 4r²
    "neyman": ((-4.0, 8.0), (-2.0, 4.0), (-1.0, 2.0)),  # -2/r, 4/r
}


def null(n):
    return torch.full((n,), -1, dtype=torch.long)


@pytest.mark.parametrize("name", sorted(divergences.DIVERGENCES))
def test_weight_is_f_second_derivative_times_r_squared(name):
    assert sorted(HAND) == sorted(divergences.DIVERGENCES)
    for r, expected in zip((0.5, 1.0, 2.0), HAND[name], strict=True):
        assert divergences.h_of_r(name, r) == pytest.approx(expected, rel=1e-9)
    f = divergences.get(name).f
    for r0 in (0.3, 1.0, 2.5, 7.0):  # against autograd on f itself
        r = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
        (d1,) = torch.autograd.grad(f(r), r, create_graph=True)
        (d2,) = torch.autograd.grad(d1, r)
        assert float(d2) * r0**2 == pytest.approx(divergences.h_of_r(name, r0), rel=1e-9)
        assert float(f(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", sorted(divergences.DIVERGENCES))
def test_weight_derivatives_against_hand_values_and_autograd(name):
    assert sorted(HAND_DERIVATIVES) == sorted(divergences.DIVERGENCES)
    div = divergences.get(name)
    for r, (rh1, r2h2) in zip((0.5, 1.0, 2.0), HAND_DERIVATIVES[name], strict=True):
        lr = torch.tensor(math.log(r), dtype=torch.float64)
        assert float(div.rh1(lr)) == pytest.approx(rh1, rel=1e-9, abs=1e-12)
        assert float(div.r2h2(lr)) == pytest.approx(r2h2, rel=1e-9, abs=1e-12)
    for r0 in (0.3, 2.5):  # h as a function of r, differentiated twice
        r = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
        h = div.h(torch.log(r))
        if not h.requires_grad:  # constant h
            continue
        (d1,) = torch.autograd.grad(h, r, create_graph=True)
        (d2,) = torch.autograd.grad(d1, r, allow_unused=True)
        d2 = torch.zeros(()) if d2 is None else d2
        lr = torch.tensor(math.log(r0), dtype=torch.float64)
        assert float(div.rh1(lr)) == pytest.approx(r0 * d1.item(), rel=1e-9, abs=1e-12)
        assert float(div.r2h2(lr)) == pytest.approx(r0**2 * d2.item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(divergences.DIVERGENCES))
@pytest.mark.parametrize("theta", expansion.THETAS)
def test_tractable_gradient_is_the_exact_gradient_of_the_expanded_divergence(name, theta):
    """E[∇_θ L] (Gauss-Hermite over z, ε; exact scores and exact r held fixed) against central differences of
    J_t(θ) = E_{q_t}[h(r) (s_p - s_q)²] by quadrature: a 1-D Gaussian-mixture teacher, a Gaussian student."""
    pb, theta = expansion.Problem(), torch.tensor(theta, dtype=torch.float64)
    true = expansion.true_gradient(name, theta, pb)
    parts = expansion.tractable_gradient(name, theta, pb, n_nodes=60, parts=True)
    assert expansion.relative_error(parts["score"] + parts["ratio"], true) < 1e-4
    if name == "reverse_kl":  # h ≡ 1: SiD at α = ½ alone is exact
        assert float(parts["ratio"].abs().max()) == 0.0
    else:  # both branches are needed
        assert expansion.relative_error(parts["score"], true) > 1e-2
    # the previous combination (h-weighted DMD + h-weighted SiD at α = 1) is not the gradient
    old = expansion.previous_gradient(name, theta, pb, n_nodes=60)["both"]
    assert expansion.relative_error(old, true) > 0.1


def test_score_branch_is_h_weighted_sid_with_a_per_sample_alpha():
    """h · SiD_½ - ½ r h' ||y_r - y_f||² = h · SiD_{α(r)}, α(r) = ½ (1 + r h' / h)."""
    g = torch.Generator().manual_seed(0)
    x, y_r, y_f = (torch.randn(6, 4, generator=g) for _ in range(3))
    log_r = torch.linspace(-2, 2, 6)
    div = divergences.get("js")
    h, rh1 = div.h(log_r), div.rh1(log_r)
    w = torch.rand(6, generator=g) + 0.5
    per_alpha = torch.stack(
        [
            losses.sid_loss(
                x[i : i + 1], y_r[i : i + 1], y_f[i : i + 1], float(0.5 * (1 + rh1[i] / h[i])), w[i]
            )
            for i in range(6)
        ]
    )[:, 0]
    torch.testing.assert_close(tractable.score_branch(x, y_r, y_f, h, rh1, 0.5, w), h * per_alpha)


def test_weights_are_clipped_and_normalised_by_the_batch_mean():
    log_r = torch.tensor([0.0, math.log(3.0), 50.0])
    w = divergences.weights("forward_kl", log_r, 3, max_log_ratio=5.0)
    raw = torch.tensor([1.0, 3.0, math.exp(5.0)])
    torch.testing.assert_close(w, raw / raw.mean())
    torch.testing.assert_close(divergences.weights("reverse_kl", None, 4), torch.ones(4))
    h, rh1, r2h2 = divergences.branch_weights("pearson", log_r, 3, max_log_ratio=5.0)
    raw = 2 * torch.tensor([1.0, 9.0, math.exp(10.0)])  # 2 r², r clipped at e⁵
    torch.testing.assert_close(h, raw / raw.mean())
    torch.testing.assert_close(rh1, 2 * raw / raw.mean())  # 4 r²
    torch.testing.assert_close(r2h2, 2 * raw / raw.mean())
    h, rh1, r2h2 = divergences.branch_weights("reverse_kl", None, 4)
    torch.testing.assert_close(torch.stack([h, rh1, r2h2]), torch.tensor([[1.0] * 4, [0.0] * 4, [0.0] * 4]))
    with pytest.raises(ValueError, match="one of"):
        divergences.get("total_variation")


def test_beta_clip_only_acts_on_outliers():
    """The DI-like branch's clip (``beta_clip``): None is the exact branch; a batch with no per-sample weight
    |½ SNR β' / w| beyond clip × the batch median gives the exact loss and gradient; an outlier is capped at the
    bound (sign kept) and the other samples are untouched."""
    g = torch.Generator().manual_seed(0)
    n = 32
    x, y_r, y_f = (torch.randn(n, 4, generator=g) for _ in range(3))
    rh1, r2h2 = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    snr = torch.rand(n, generator=g) + 1.0

    def branch(clip, snr=snr):
        xg = x.clone().requires_grad_(True)
        per = tractable.ratio_branch(xg, y_r, y_f, rh1, r2h2, snr, w, clip)
        (grad,) = torch.autograd.grad(per.sum(), xg)
        return per.detach(), grad

    e = (0.5 * snr * tractable.ratio_weight(x, y_r, y_f, rh1, r2h2) / w).abs()
    assert float(e.max() / e.median()) < 50  # no outlier at clip 50
    exact, exact_grad = branch(None)
    for clip in (50.0, 1e9):
        per, grad = branch(clip)
        torch.testing.assert_close(per, exact, rtol=0, atol=0)
        torch.testing.assert_close(grad, exact_grad, rtol=0, atol=0)
    # one outlier: SNR x 10⁵ on sample 0 (the median barely moves)
    spiky = snr.clone()
    spiky[0] *= 1e5
    exact, exact_grad = branch(None, spiky)
    per, grad = branch(50.0, spiky)
    e = 0.5 * spiky * tractable.ratio_weight(x, y_r, y_f, rh1, r2h2) / w
    bound = 50 * e.abs().median()
    assert float(e[0].abs()) > bound and float(e[1:].abs().max()) < bound
    torch.testing.assert_close(per[1:], exact[1:], rtol=0, atol=0)
    torch.testing.assert_close(grad[1:], exact_grad[1:], rtol=0, atol=0)
    torch.testing.assert_close(per[0], exact[0] * bound / e[0].abs())
    assert float(per[0].abs()) < float(exact[0].abs())
    with pytest.raises(ValueError, match="clip"):
        tractable.clip_to_median(e, 0.0)


def test_exact_setting_is_reachable_from_the_recipes():
    cfg = load_config(REPO / "assets/configs/digits_uni.yaml", ["teacher=x", "output_dir=/tmp/x"])
    assert cfg.section.beta_clip == 10.0
    cfg = load_config(
        REPO / "assets/configs/digits_uni.yaml", ["teacher=x", "output_dir=/tmp/x", "uni.beta_clip=null"]
    )
    assert cfg.section.beta_clip is None


def _nets(seed=0):
    torch.manual_seed(seed)
    acp = scaled_linear_alphas_cumprod()
    gen = MLPDenoiser(acp, dim=DIM, num_classes=CLASSES, hidden=16, depth=2, prediction_type="sample")
    fake = MLPDenoiser(acp, dim=DIM, num_classes=CLASSES, hidden=16, depth=2, prediction_type="epsilon")
    teacher = MLPDenoiser(acp, dim=DIM, num_classes=CLASSES, hidden=16, depth=2, prediction_type="epsilon")
    teacher.requires_grad_(False)
    return gen, fake, teacher


def _uni(gen, fake, teacher, head=None, **kw):
    cfg = UniConfig(init_timestep=999, min_step=20, max_step=900, guidance="cfg", **kw)
    return UniInstruct(
        gen,
        fake,
        teacher,
        cfg,
        (DIM,),
        dict(gen.named_parameters()),
        dict(fake.named_parameters()),
        null,
        head,
    )


def _generator_grads(method, gen, g, cond, step=0):
    gen.zero_grad()
    terms = method.loss("generator", {"cond": cond}, step, g)
    sum(terms.values()).backward()
    return terms, {n: p.grad.clone() for n, p in gen.named_parameters()}


@pytest.mark.parametrize("w", [1.0, 1.5])
def test_reverse_kl_fdistill_branch_is_dmd2s_generator_gradient(w):
    gen, fake, teacher = _nets()
    cond = torch.arange(N) % CLASSES
    kw = dict(kl_weight=0.0, score_weight=0.0, fdistill_weight=1.0, guidance_scale=w)
    uni = _uni(gen, fake, teacher, divergence="reverse_kl", **kw)
    gen2, fake2 = copy.deepcopy(gen), copy.deepcopy(fake)
    dcfg = DMD2Config(guidance_scale=w, student_timesteps=[999], min_step=20, max_step=899)  # U[20, 900)
    dmd2 = DMD2(gen2, fake2, CFG(teacher, w, null), dcfg, (DIM,), dict(gen2.named_parameters()), {})
    # the same batch: DMD2 draws its step index k (one value here) before the noise, SiD's sampler does not
    g_uni = torch.Generator().manual_seed(3)
    torch.randint(0, 1, (N,), generator=g_uni)
    terms_uni, grads_uni = _generator_grads(uni, gen, g_uni, cond)
    terms_dmd, grads_dmd = _generator_grads(dmd2, gen2, torch.Generator().manual_seed(3), cond)
    assert set(terms_uni) == set(terms_dmd) == {"dm"}
    torch.testing.assert_close(terms_uni["dm"], terms_dmd["dm"])
    for name in grads_dmd:
        torch.testing.assert_close(grads_uni[name], grads_dmd[name], rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads_uni.values())


@pytest.mark.parametrize("guidance", ["cfg", "lsg"])
def test_reverse_kl_score_branch_is_sids_generator_gradient(guidance):
    gen, fake, teacher = _nets(1)
    cond = torch.arange(N) % CLASSES
    kw = dict(guidance=guidance, guidance_scale=1.5, alpha=1.2, init_timestep=999, min_step=20, max_step=900)
    # kl_weight = 1: reverse KL has no DI-like branch (β ≡ 0), so the default mix is SiD's loss alone
    uni_cfg = UniConfig(divergence="reverse_kl", kl_weight=1.0, score_weight=1.0, **kw)
    gen2, fake2 = copy.deepcopy(gen), copy.deepcopy(fake)
    uni = UniInstruct(
        gen, fake, teacher, uni_cfg, (DIM,), dict(gen.named_parameters()), dict(fake.named_parameters()), null
    )
    sid = SiD(
        gen2, fake2, teacher, SiDConfig(**kw), (DIM,), dict(gen2.named_parameters()), dict(fake2.named_parameters()),
        null,
    )  # fmt: skip
    for step in (0, 1):
        terms_uni, grads_uni = _generator_grads(uni, gen, torch.Generator().manual_seed(5), cond, step)
        terms_sid, grads_sid = _generator_grads(sid, gen2, torch.Generator().manual_seed(5), cond, step)
        assert set(terms_uni) == set(terms_sid) == {"sid"}
        torch.testing.assert_close(terms_uni["sid"], terms_sid["sid"])
        for name in grads_sid:
            torch.testing.assert_close(grads_uni[name], grads_sid[name])
        # and the critic (fake-score) loss is SiD's too
        c_uni = uni.loss("critic", {"cond": cond}, step, torch.Generator().manual_seed(6))
        c_sid = sid.loss("critic", {"cond": cond}, step, torch.Generator().manual_seed(6))
        torch.testing.assert_close(c_uni["fake_dsm"], c_sid["fake_dsm"])


class FixedLogits(nn.Module):
    """A discriminator head that returns given logits (log r) whatever the features."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features):
        return self.logits * self.scale


@pytest.mark.parametrize("name", ["forward_kl", "js", "jeffreys", "squared_hellinger", "neyman"])
def test_each_sample_is_weighted_by_the_heads_ratio(name):
    gen, fake, teacher = _nets(2)
    cond = torch.arange(N) % CLASSES
    logits = torch.linspace(-2, 2, N)
    uni = _uni(
        gen,
        fake,
        teacher,
        FixedLogits(logits),
        divergence=name,
        kl_weight=0.7,
        score_weight=0.3,
        fdistill_weight=0.2,
        guidance_scale=1.0,
        beta_clip=None,  # the exact estimator
    )
    terms = uni.loss("generator", {"cond": cond}, 0, torch.Generator().manual_seed(0))
    # replay the draws: x, t, ε; then the three branches by hand
    g = torch.Generator().manual_seed(0)
    x = gen(torch.randn(N, DIM, generator=g), 999, cond)
    t = torch.randint(20, 900, (N,), generator=g)
    acp = gen.alphas_cumprod
    a, s = acp[t].sqrt()[:, None], (1 - acp[t]).sqrt()[:, None]
    x_t = a * x + s * torch.randn(N, DIM, generator=g)
    y_r = teacher(x_t, t, cond)
    y_f = fake(x_t, t, cond)
    r = [math.exp(v) for v in logits.tolist()]
    h = torch.tensor([divergences.h_of_r(name, v) for v in r], dtype=torch.float32)
    div = divergences.get(name)
    rh1, r2h2 = div.rh1(logits), div.r2h2(logits)
    mean_h = h.mean()
    h, rh1, r2h2 = h / mean_h, rh1 / mean_h, r2h2 / mean_h
    w = (x - y_r).abs().mean(1).detach()
    diff = y_r - y_f
    sid_half = (diff * ((y_r - x) - 0.5 * diff)).mean(1) / w
    torch.testing.assert_close(terms["dm"], 0.2 * (h * dmd_per_sample(x, y_r, y_f)).mean())
    torch.testing.assert_close(terms["sid"], 0.3 * (h * sid_half - 0.5 * rh1 * (diff**2).mean(1) / w).mean())
    beta = (r2h2 * (diff**2).sum(1) + 2 * rh1 * (diff * (x - y_f)).sum(1)).detach()
    snr = acp[t] / (1 - acp[t])
    di = 0.5 * snr * beta * ((-diff.detach()) * x).mean(1) / w
    torch.testing.assert_close(terms["di"], 0.7 * di.mean())
    # with the clip: the per-sample weight ½ SNR β / w capped at beta_clip × its batch median
    uni.cfg.beta_clip = 2.0
    clipped = uni.loss("generator", {"cond": cond}, 0, torch.Generator().manual_seed(0))
    e = 0.5 * snr * beta / w
    bound = 2.0 * e.abs().median()
    assert bool((e.abs() > bound).any())  # the clip acts here
    di = e.clamp(-bound, bound) * ((-diff.detach()) * x).mean(1)
    torch.testing.assert_close(clipped["di"], 0.7 * di.mean())
    torch.testing.assert_close(clipped["sid"], terms["sid"])


def test_data_free_discriminator_trains_on_teacher_samples():
    gen, fake, teacher = _nets(3)
    head = DiscriminatorHead(16)
    uni = _uni(gen, fake, teacher, head, divergence="js", teacher_sample_steps=3)
    cond = torch.arange(N) % CLASSES
    terms = uni.loss("critic", {"cond": cond}, 0, torch.Generator().manual_seed(0))
    assert set(terms) == {"fake_dsm", "gan_d"}
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert "head.net.0.weight" in {n for g in uni.groups() if g.name == "critic" for n in g.params}
    x = uni.teacher_samples(cond, N, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (N, DIM) and torch.isfinite(x).all()
    # with real images the discriminator sees them instead (no teacher sampling)
    calls = []
    uni.teacher_samples = lambda *a: calls.append(a)
    uni.loss("critic", {"cond": cond, "real": torch.randn(N, DIM)}, 0, torch.Generator().manual_seed(0))
    assert calls == []


def test_bad_uni_config_is_a_clear_error():
    gen, fake, teacher = _nets()
    with pytest.raises(ValueError, match="needs the discriminator head"):
        _uni(gen, fake, teacher, None, divergence="forward_kl")
    with pytest.raises(ValueError, match="uni.divergence must be one of"):
        _uni(gen, fake, teacher, DiscriminatorHead(16), divergence="tv")
    with pytest.raises(ValueError, match="not all 0"):
        _uni(gen, fake, teacher, None, divergence="reverse_kl", kl_weight=0.0, score_weight=0.0)
    with pytest.raises(ValueError, match="no DI-like branch"):
        _uni(gen, fake, teacher, None, divergence="reverse_kl", kl_weight=1.0, score_weight=0.0)


@pytest.mark.parametrize("recipe", ["digits_uni", "sd15_uni_1step", "sdxl_uni_1step"])
def test_recipes_load_with_the_uni_section(recipe):
    cfg = load_config(REPO / f"assets/configs/{recipe}.yaml", ["teacher=x", "output_dir=/tmp/x"])
    assert cfg.method == "uni" and isinstance(cfg.section, UniConfig)
    divergences.get(cfg.section.divergence)


def test_short_gmm_run_moves_the_one_step_student_toward_the_teacher(tmp_path):
    from fastdiff.eval import uni_gmm
    from fastdiff.eval.gmm_setup import NUM_CLASSES, networks, paired_gmm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gmm = paired_gmm()
        _, _, before = networks(gmm, NUM_CLASSES, seed=0)  # the pretrained generator a run starts from
        labels = torch.arange(NUM_CLASSES).repeat_interleave(500)
        noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            nll_before = float(-gmm.log_prob(before(noise, torch.tensor(999), labels), labels).mean())
        method = uni_gmm.train_uni(gmm, uni_gmm.uni_config("forward_kl"), 200, 0, str(tmp_path))
        report = uni_gmm.evaluate(method, gmm, per_class=500)
    finally:
        torch.set_num_threads(threads)
    print(f"1-step NLL before {nll_before:.3f}, after 200 iterations {report['nll']:.3f} "
          f"(true {report['nll_true']:.3f}), coverage {report['mode_coverage']:.3f}")  # fmt: skip
    assert report["nll"] < nll_before
    assert report["nll"] < report["nll_true"] + 0.5 * abs(report["nll_true"])
