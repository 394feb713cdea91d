"""Distribution metrics on feature sets that need no Gaussian fit: KID and k-NN precision/recall.

Features are [N, D] tensors (any float dtype; computed in float64 on the CPU). ``a`` is the generated set and ``b``
the reference set where the metric is asymmetric.

- ``kid``: Kernel Inception Distance (Bińkowski et al. 2018) in any feature space: the unbiased estimate of
  MMD^2 with the polynomial kernel k(x, y) = (x.y / D + 1)^3,
  MMD^2_u = sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1)) - 2 sum_{i,j} k(a_i, b_j) / m^2,
  over ``subsets`` random subsets of m = min(``subset_size``, N_a, N_b) points of each set (drawn without
  replacement from a generator seeded with ``seed``, so the number is reproducible); returns the mean and the
  standard deviation over the subsets. The same estimator and kernel as torchmetrics' ``KernelInceptionDistance``
  (tested against its ``poly_mmd``), written out here so the digits bench needs no optional dependency and draws its
  subsets from its own generator rather than the global one. Unbiased: ~0 (either sign) for two samples of one
  distribution, at any m >= 2 (a set against itself is not two independent samples: with subsets of the whole
  set it gives -2 (mean_i k(x_i, x_i) - mean_{i!=j} k(x_i, x_j)) / m, slightly negative, O(1/m)). The kernel is
  not scale-invariant: compare numbers in one feature space only.
- ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019). Each point of a set gets a ball
  whose radius is the distance to its k-th nearest neighbour in its own set (itself excluded); the set's manifold is
  the union of its balls. Precision = fraction of generated points inside the reference manifold (fidelity: low
  when samples lie off the data); recall = fraction of reference points inside the generated manifold (variety:
  low when modes are dropped). Both in [0, 1]; recall is NaN when the generated set has <= k points. They depend on
  the set sizes: compare numbers computed with the same N.
"""

from __future__ import annotations

import math

import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3


def _as2d(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach().double().cpu()
    return x.reshape(x.shape[0], -1)


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / D + 1)^3 for all pairs: [N_x, N_y]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(a: torch.Tensor, b: torch.Tensor) -> float:
    """The unbiased MMD^2 estimate (module docstring) of two sets of m points each, m >= 2."""
    m = a.shape[0]
    if b.shape[0] != m or m < 2:
        raise ValueError(f"need two sets of the same size >= 2, got {a.shape[0]} and {b.shape[0]}")
    k_aa, k_bb, k_ab = poly_kernel(a, a), poly_kernel(b, b), poly_kernel(a, b)
    within = (k_aa.sum() - k_aa.diagonal().sum() + k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_ab.sum() / m**2)


def kid(
    a, b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets (module docstring); NaNs when a set
    has fewer than 2 points."""
    a, b = _as2d(a), _as2d(b)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            mmd2_unbiased(
                a[torch.randperm(a.shape[0], generator=g)[:m]], b[torch.randperm(b.shape[0], generator=g)[:m]]
            )
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def knn_radii(x, k: int = PR_K) -> torch.Tensor:
    """Distance of each point [N, D] to its k-th nearest neighbour among the others: [N]; needs N > k."""
    x = _as2d(x)
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {x.shape[0]}")
    d = torch.cdist(x, x)
    d.fill_diagonal_(math.inf)  # itself excluded
    return d.kthvalue(k, dim=1).values


def inside(points, centres, radii: torch.Tensor) -> torch.Tensor:
    """[N] bool: whether each point lies in at least one ball (centre, radius)."""
    return (torch.cdist(_as2d(points), _as2d(centres)) <= radii[None]).any(1)


def precision_recall(a, b, k: int = PR_K, b_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of generated features ``a`` against reference features ``b`` (module docstring);
    ``b_radii``: the reference's k-NN radii when cached."""
    a, b = _as2d(a), _as2d(b)
    if b_radii is None:
        b_radii = knn_radii(b, k)
    precision = float(inside(a, b, b_radii).double().mean())
    recall = float(inside(b, a, knn_radii(a, k)).double().mean()) if a.shape[0] > k else math.nan
    return precision, recall
