"""The analytic GMM teacher and its exact metrics (fastdiff.models.gmm, fastdiff.eval.gmm_metrics)."""

import math

import pytest
import torch

from fastdiff import schedule
from fastdiff.eval.gmm_metrics import gmm_report, mode_coverage, mode_weight_error, nll, sliced_w2
from fastdiff.models.gmm import GMM, GMMDenoiser, MLPDenoiser, scaled_linear_alphas_cumprod

ACP = scaled_linear_alphas_cumprod()


@pytest.fixture
def gmm1d():
    # two overlapping components of different width and weight, two classes
    return GMM(weights=[0.3, 0.7], means=[[-1.5], [2.0]], stds=[0.5, 0.8], classes=[0, 1])


@pytest.fixture
def gmm2d():
    return GMM.random(num_classes=4, modes_per_class=2, dim=2, seed=0)


def _grid_posterior_mean(gmm, x_t, a, s, comps=None):
    """E[x0 | x_t] by numerical integration of p(x0) N(x_t; a x0, s^2) on a fine 1-D grid (float64)."""
    x0 = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    mu, sd, w = gmm.means[:, 0].double(), gmm.stds.double(), gmm.weights.double()
    if comps is not None:
        w = torch.zeros_like(w).index_fill(0, torch.tensor(comps), 1.0) * w
    prior = (w[:, None] * torch.exp(-0.5 * ((x0[None] - mu[:, None]) / sd[:, None]) ** 2) / sd[:, None]).sum(
        0
    )
    lik = torch.exp(-0.5 * ((x_t[:, None] - a * x0[None]) / s) ** 2)
    post = prior[None] * lik
    return (post * x0[None]).sum(1) / post.sum(1)


def test_scaled_linear_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.equal(ACP, ref)
    assert ACP.shape == (1000,) and abs(float(ACP[-1]) - 0.00466) < 1e-4


@pytest.mark.parametrize("a,s", [(0.95, 0.3), (0.6, 0.8), (0.2, 0.98), (1.0, 0.05)])
def test_denoise_matches_numerical_integration(gmm1d, a, s):
    x_t = torch.linspace(-4, 4, 17, dtype=torch.float64)[:, None]
    exact = gmm1d.denoise(x_t, a, s)[:, 0]
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, _grid_posterior_mean(gmm1d, x_t[:, 0], a, s), atol=1e-6, rtol=0)
    # conditional on class 1 (component 1 only), per-row tensor alpha/sigma of shape [n, 1]
    labels = torch.ones(17, dtype=torch.long)
    a_t, s_t = torch.full((17, 1), a, dtype=torch.float64), torch.full((17, 1), s, dtype=torch.float64)
    cond = gmm1d.denoise(x_t, a_t, s_t, labels)[:, 0]
    torch.testing.assert_close(
        cond, _grid_posterior_mean(gmm1d, x_t[:, 0], a, s, comps=[1]), atol=1e-6, rtol=0
    )


def test_denoise_limits(gmm2d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g) * 5
    labels = torch.randint(-1, 4, (64,), generator=g)
    # sigma -> 0: the observation is the clean sample
    torch.testing.assert_close(gmm2d.denoise(x, 1.0, 1e-4, labels), x, atol=1e-4, rtol=0)
    # alpha -> 0: no information, the (class-conditional) mixture mean
    torch.testing.assert_close(gmm2d.denoise(x, 0.0, 1.0, labels), gmm2d.mean(labels, 64), atol=1e-5, rtol=0)
    means_by_class = torch.stack(
        [gmm2d.means[gmm2d.classes == c].T @ gmm2d.weights[gmm2d.classes == c] for c in range(4)]
    )
    means_by_class = (
        means_by_class / torch.stack([gmm2d.weights[gmm2d.classes == c].sum() for c in range(4)])[:, None]
    )
    got = gmm2d.denoise(x[:4], 1e-9, 1.0, torch.arange(4))  # responsibilities move by ~alpha |mu| |x|
    torch.testing.assert_close(got, means_by_class, atol=1e-4, rtol=0)
    # numerically stable far from every mode (log-sum-exp), and differentiable in x_t
    far = torch.tensor([[1e3, -1e3]], requires_grad=True)
    out = gmm2d.denoise(far, 0.9, 0.1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(far.grad).all()


def test_log_prob_exact_and_normalised(gmm1d, gmm2d):
    x = torch.linspace(-12, 12, 48_001, dtype=torch.float64)[:, None]
    dx = float(x[1] - x[0])
    for labels in (None, torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)):
        assert abs(float(gmm1d.log_prob(x, labels).exp().sum()) * dx - 1.0) < 1e-4
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=gmm2d.weights),
        torch.distributions.Independent(
            torch.distributions.Normal(gmm2d.means, gmm2d.stds[:, None].expand(-1, 2)), 1
        ),
    )
    pts = torch.randn(100, 2) * 4
    torch.testing.assert_close(gmm2d.log_prob(pts), ref.log_prob(pts), atol=1e-4, rtol=1e-5)
    # -1 means unconditional
    torch.testing.assert_close(gmm2d.log_prob(pts, torch.full((100,), -1)), gmm2d.log_prob(pts))
    with pytest.raises(ValueError):
        gmm2d.log_prob(pts, torch.full((100,), 7))


def test_sampling_and_responsibilities(gmm2d):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 4, (4000,), generator=g)
    x0, lab, comp = gmm2d.sample(4000, labels, generator=g)
    assert x0.shape == (4000, 2) and torch.equal(lab, labels)
    cond = labels >= 0
    assert torch.equal(gmm2d.classes[comp[cond]], labels[cond])  # conditional rows only hit their class
    assert len(gmm2d.classes[comp[~cond]].unique()) == 4  # unconditional rows hit every class
    # the sampled component is recovered from x0 (modes are well separated)
    assert (gmm2d.responsibilities(x0).argmax(1) == comp).float().mean() > 0.999
    # unconditional frequencies follow the weights; same generator seed -> same draw
    x_a, lab_a, comp_a = gmm2d.sample(20_000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(lab_a, gmm2d.classes[comp_a])
    freq = torch.bincount(comp_a, minlength=8).float() / 20_000
    assert (freq - gmm2d.weights).abs().max() < 0.015
    assert torch.equal(x_a, gmm2d.sample(20_000, generator=torch.Generator().manual_seed(2))[0])
    # modes are clearly separated relative to std, also in higher dimensions
    for dim in (1, 2, 16):
        m = GMM.random(num_classes=5, modes_per_class=3, dim=dim, std=0.3)
        d = torch.cdist(m.means, m.means) + torch.eye(15) * 1e9
        assert d.min() >= 8 * 0.3 - 1e-4


def test_metrics_on_true_and_collapsed_samples(gmm2d):
    g = torch.Generator().manual_seed(3)
    x0, _, comp = gmm2d.sample(20_000, generator=g)
    assert mode_coverage(x0, gmm2d) == 1.0
    assert mode_weight_error(x0, gmm2d) < 0.02
    # well-separated modes: NLL of true samples = entropy H(pi) + sum_k pi_k D/2 log(2 pi e s_k^2)
    ent = float(
        -(gmm2d.weights * gmm2d.weights.log()).sum()
        + (gmm2d.weights * torch.log(2 * math.pi * math.e * gmm2d.stds**2)).sum()
    )
    assert abs(nll(x0, gmm2d) - ent) < 0.05
    # mode collapse: everything from component 0
    one = x0[comp == 0]
    assert mode_coverage(one, gmm2d) == pytest.approx(1 / 8)
    assert mode_weight_error(one, gmm2d) == pytest.approx(1 - float(gmm2d.weights[0]), abs=1e-6)
    # conditional: right class -> covered; the neighbouring class -> nothing covered, TV = 1
    labels = torch.randint(0, 4, (4000,), generator=g)
    xc = gmm2d.sample(4000, labels, generator=g)[0]
    assert mode_coverage(xc, gmm2d, labels) == 1.0 and mode_weight_error(xc, gmm2d, labels) < 0.05
    assert mode_coverage(xc, gmm2d, (labels + 1) % 4) == 0.0
    assert mode_weight_error(xc, gmm2d, (labels + 1) % 4) == pytest.approx(1.0)
    rep = gmm_report(xc, gmm2d, labels)
    assert set(rep) == {"nll", "nll_true", "mode_coverage", "mode_weight_error", "sw2"}
    assert abs(rep["nll"] - rep["nll_true"]) < 0.1 and rep["sw2"] < 0.3 and rep["mode_coverage"] == 1.0
    bad = gmm_report(xc * 0.5, gmm2d, labels)  # shrunk samples: off-manifold
    assert bad["nll"] > rep["nll"] + 5 and bad["sw2"] > 1.0


def test_sliced_w2():
    a = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    assert sliced_w2(a, a) == 0.0
    shift = torch.zeros(8)
    prev = 0.0
    for d in (0.5, 1.0, 2.0):
        shift[0] = d
        sw = sliced_w2(a, a + shift, num_projections=2048)
        assert sw > prev
        # identical sets shifted by delta: SW2^2 = E_theta (theta . delta)^2 = |delta|^2 / D
        assert sw == pytest.approx(d / math.sqrt(8), rel=0.1)
        prev = sw
    b = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))  # unequal sizes: subsampled
    assert sliced_w2(a, b) < 0.1


def test_gmm_denoiser_matches_closed_form():
    gmm = GMM.random(num_classes=3, modes_per_class=2, dim=16, spread=3.0, std=0.5, seed=4)
    den = GMMDenoiser(gmm, ACP)
    n = 32
    x_t = torch.randn(n, 1, 4, 4) * 2  # a 16-dim GMM standing in for a 1x4x4 latent
    t = torch.randint(0, 1000, (n,))
    cond = torch.randint(-1, 3, (n,))
    a, s = ACP[t].sqrt()[:, None], (1 - ACP[t]).sqrt()[:, None]
    ref = gmm.denoise(x_t.reshape(n, 16), a, s, cond).reshape(n, 1, 4, 4)
    torch.testing.assert_close(den(x_t, t, cond), ref)
    x0, feats = den(x_t, t, cond, features=True)
    assert feats is None and torch.equal(x0, den(x_t, t, cond))
    # scalar timestep and no condition = unconditional
    torch.testing.assert_close(
        den.native(x_t, 500, None), den(x_t, torch.full((n,), 500), torch.full((n,), -1))
    )


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_mlp_denoiser_shapes(ptype):
    net = MLPDenoiser(ACP, dim=2, num_classes=4, hidden=32, prediction_type=ptype)
    x_t, t = torch.randn(10, 2), torch.randint(0, 1000, (10,))
    cond = torch.tensor([-1, 0, 1, 2, 3, -1, 0, 1, 2, 3])
    pred, h = net.native(x_t, t, cond, features=True)
    assert pred.shape == (10, 2) and h.shape == (10, 32)
    x0 = net(x_t, t, cond)
    assert x0.shape == (10, 2) and torch.isfinite(x0).all()
    assert torch.isfinite(net(x_t, torch.full((10,), 999), None)).all()
    # label -1 uses the null row: it differs from every real class
    assert not torch.allclose(
        net.native(x_t[:1], t[:1], torch.tensor([-1])), net.native(x_t[:1], t[:1], torch.tensor([0]))
    )
    copy = MLPDenoiser(ACP, dim=2, num_classes=4, hidden=32, prediction_type=ptype, init_from=net)
    torch.testing.assert_close(copy(x_t, t, cond), x0)


def test_mlp_trained_by_dsm_approaches_exact_denoiser():
    torch.manual_seed(0)
    gmm = GMM.random(num_classes=2, modes_per_class=2, dim=2, spread=2.0, std=0.3, seed=1)
    teacher = GMMDenoiser(gmm, ACP)
    net = MLPDenoiser(ACP, dim=2, num_classes=2, hidden=128)
    g = torch.Generator().manual_seed(5)
    x0e, ce, _ = gmm.sample(2048, generator=g)
    te = torch.randint(0, 1000, (2048,), generator=g)
    xte = schedule.add_noise(x0e, torch.randn(x0e.shape, generator=g), te, ACP)

    def err():
        with torch.no_grad():
            return float(((net(xte, te, ce) - teacher(xte, te, ce)) ** 2).sum(1).mean())

    before = err()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(400):
        x0, c, _ = gmm.sample(256)
        c = torch.where(torch.rand(256) < 0.1, -1, c)  # label dropout, as for CFG
        t = torch.randint(0, 1000, (256,))
        eps = torch.randn_like(x0)
        loss = ((net.native(schedule.add_noise(x0, eps, t, ACP), t, c) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = err()
    assert after < 0.05 * before, (before, after)
