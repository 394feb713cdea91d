"""Exact metrics against the analytic GMM teacher (DESIGN §3); pure functions of tensors returning floats.

- ``nll``: mean -log p(x) under the true mixture (precision: samples off the data manifold score badly).
- ``mode_coverage`` / ``mode_weight_error``: recall, from the component each sample most likely came from.
- ``sliced_w2``: sliced Wasserstein-2 distance to true samples (overall distribution match).

Samples may have any shape [n, ...] with prod(...) = D. ``labels`` (long [n], -1 = unconditional) are the
conditions the samples were generated for; expectations are then conditioned on them row by row.
"""

from __future__ import annotations

import torch

from ..models.gmm import GMM


def nll(samples: torch.Tensor, gmm: GMM, labels=None) -> float:
    """Mean negative log-likelihood -1/n sum_i log p(x_i | c_i) in nats."""
    return float(-gmm.log_prob(samples, labels).mean())


def _counts(samples: torch.Tensor, gmm: GMM, labels=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(observed [K], expected [K], wrong): per-component counts.

    Each sample goes to its most responsible component under the *unconditional* mixture. With labels, a
    sample that lands in a component outside its own class counts as ``wrong`` (for no component), so a
    generator that ignores its condition loses coverage. Expected: sum_i pi_{k|c_i} (n pi_k without labels).
    """
    n = samples.shape[0]
    gmm = gmm.to(samples.device)
    comp = gmm.responsibilities(samples).argmax(1)
    if labels is None:
        expected, ok = n * gmm.weights, torch.ones_like(comp, dtype=torch.bool)
    else:
        logw = gmm.log_weights(labels, n)
        expected = logw.exp().sum(0)
        ok = torch.isfinite(logw.gather(1, comp[:, None]).squeeze(1))
    observed = torch.bincount(comp[ok], minlength=gmm.num_components).float()
    return observed, expected, int((~ok).sum())


def mode_coverage(samples: torch.Tensor, gmm: GMM, labels=None, min_fraction: float = 0.1) -> float:
    """Fraction of the reachable components (expected count > 0) that received >= min_fraction x expected."""
    observed, expected, _ = _counts(samples, gmm, labels)
    reach = expected > 0
    return float((observed[reach] >= min_fraction * expected[reach]).float().mean())


def mode_weight_error(samples: torch.Tensor, gmm: GMM, labels=None) -> float:
    """Total variation between empirical and true mode frequencies: 0.5 (sum_k |obs_k - exp_k| + wrong) / n.

    ``wrong`` counts samples that landed in a component outside their class (an extra bin with expectation 0).
    """
    observed, expected, wrong = _counts(samples, gmm, labels)
    n = samples.shape[0]
    return float(0.5 * ((observed - expected).abs().sum() + wrong) / n)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2: sqrt( E_theta W2^2(theta.a, theta.b) ) over random unit directions theta.

    In 1-D, W2 between equal-size empirical sets pairs the sorted values. The larger set is subsampled
    (seeded) to the size of the smaller.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = a.reshape(a.shape[0], -1).double().cpu(), b.reshape(b.shape[0], -1).double().cpu()
    m = min(a.shape[0], b.shape[0])
    if a.shape[0] > m:
        a = a[torch.randperm(a.shape[0], generator=g)[:m]]
    if b.shape[0] > m:
        b = b[torch.randperm(b.shape[0], generator=g)[:m]]
    theta = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def gmm_report(samples: torch.Tensor, gmm: GMM, labels=None, reference: torch.Tensor | None = None) -> dict:
    """All metrics in one dict: nll, nll_true, mode_coverage, mode_weight_error, sw2.

    ``reference``: true samples to compare with (same labels); default: fresh samples drawn with seed 0, so
    ``nll_true`` is the floor ``nll`` should approach and ``sw2`` has the finite-sample floor of ~0.
    """
    n = samples.shape[0]
    gmm_d = gmm.to(samples.device)
    if reference is None:
        g = torch.Generator(device=samples.device).manual_seed(0)
        reference = gmm_d.sample(n, labels, generator=g)[0]
    return {
        "nll": nll(samples, gmm_d, labels),
        "nll_true": nll(reference, gmm_d, labels),
        "mode_coverage": mode_coverage(samples, gmm_d, labels),
        "mode_weight_error": mode_weight_error(samples, gmm_d, labels),
        "sw2": sliced_w2(samples, reference),
    }
