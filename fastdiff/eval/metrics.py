"""Sample-quality metrics for generated digits, in the feature space of the evaluation classifier.

Images are [N, 1|3, H, W] in **[0, 1]** (diffusers ``output_type="pt"``); ``load_split`` gives [-1, 1], convert
with ``(x + 1) / 2``. ``labels`` are the digits the images were prompted with. Features are the classifier's
penultimate activations (``DigitClassifier.features``). The reference is the held-out (test) split by default.

- ``prompt_accuracy``: fraction of images the classifier assigns to their prompted digit (precision/condition).
- ``fd_digits``: Fréchet distance ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted
  to generated and reference features (overall distribution match; biased upwards for small sets — compare
  numbers computed with the same set sizes).
- ``per_class_coverage`` (recall of modes): the reference features of each class are split into k k-means
  clusters ("modes", fixed seed), each weighted by its share of the class's reference images. A generated image
  *hits* a mode if that mode is its nearest centroid among the modes of all classes, the mode belongs to the
  image's prompted class, and the image lies within the class's real extent (no farther from the centroid than
  the farthest reference image of that class from its own centroid). Coverage of a class = total weight of its
  modes that are hit; the result is the mean over the classes present in ``labels``. Real digits score ~1
  (0.96 with 50 images per class, 1 for the reference itself), one image per class ~1/k, noise ~0. It grows
  with the number of images: compare numbers computed with the same set sizes (>= 50 per class).
- ``within_class_diversity``: per class, the mean pairwise feature distance among generated images divided by
  the same quantity for the reference images of that class, averaged over classes with >= 2 images. ~1 for
  real-like variety, 0 for copies. Judge it next to accuracy (DESIGN §8): noise is diverse too.

A second feature space, independent of the classifier (a metric tuned against one network can be gamed in its
features): ``pixel_features``, the 8x8 grey images the data was made from. ``load_split`` makes each digit by
bilinear upsampling of scikit-learn's 8x8 image (0..16, scaled to [0, 1]) to 32x32; here an image (grey = mean of
RGB, resized to 32x32 if needed) goes back through the least-squares inverse of that upsampling, x8 = P x32 P^T
with P = pinv(U) of the 32x8 bilinear upsampling matrix U (condition number 1.7). A held-out digit comes back to
its original 8x8 values exactly; a generated image to the 8x8 image whose upsampling is nearest to it. Features:
the 64 values in [0, 1] units.

- ``fd_pixels``: the Fréchet distance above on the 64-d pixel features.
- ``kid_digits`` / ``kid_pixels`` (and ``*_std``): KID in each space, ``manifold.kid`` (our own exact unbiased
  implementation: polynomial kernel (x.y/D + 1)^3, 100 subsets of min(1000, N, N_ref), seed 0).
- ``precision`` / ``recall``: k-NN manifold precision and recall (Kynkäänniemi et al. 2019, k = 3) of the
  classifier features, ``manifold.precision_recall``; class labels are not used (unconditional, as in the paper).

``DigitsEvaluator`` caches the classifier and the reference statistics and returns the first four numbers at once
(``BASIC_KEYS``), or all of them with ``all_metrics=True`` (``METRIC_KEYS``; what ``fastdiff bench quality`` uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..digits.classifier import DEFAULT_PATH, DigitClassifier, load_classifier
from ..digits.data import RESOLUTION
from .manifold import PR_K, kid, knn_radii, precision_recall

NATIVE = 8  # scikit-learn's digits are 8x8


@torch.no_grad()
def extract_features(
    classifier: DigitClassifier, images01: torch.Tensor, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float64 on CPU, predicted labels [N]) of images in [0, 1]."""
    was_training = classifier.training
    classifier.eval()
    feats, preds = [], []
    for i in range(0, images01.shape[0], batch):
        f = classifier.features(images01[i : i + batch])
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(-1).cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(preds)


def _downsampler(size: int = RESOLUTION, native: int = NATIVE) -> torch.Tensor:
    """P [native, size]: the least-squares inverse of 1-D bilinear upsampling native -> size (as ``load_split``)."""
    basis = torch.eye(native, dtype=torch.float64)[:, None, None, :]  # each 8-pixel basis row, upsampled
    up = F.interpolate(basis, size=(1, size), mode="bilinear", align_corners=False)[:, 0, 0, :]
    return torch.linalg.pinv(up.T)  # up.T: [size, native]


_P = _downsampler()


def pixel_features(images01: torch.Tensor) -> torch.Tensor:
    """[N, 64] float64: images [N, 1|3, H, W] in [0, 1] mapped back to the digits' native 8x8 grey (module
    docstring); a held-out digit gives its scikit-learn image / 16."""
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images01.shape)}")
    x = images01.detach().float().cpu().mean(1, keepdim=True)
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(
            x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=True
        )
    return (_P @ x[:, 0].double() @ _P.T).reshape(x.shape[0], -1)


def _labels(labels, n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} images")
    return labels


# ------------------------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D], N >= 2."""
    x = torch.as_tensor(feats).double().reshape(feats.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples for a covariance")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    tr((A B)^(1/2)) is computed as tr((A^(1/2) B A^(1/2))^(1/2)) — a symmetric PSD matrix, so eigen-
    decompositions in float64 give a real, stable result (no complex sqrtm, tiny negative eigenvalues clamped).
    """
    sa = _sqrt_psd(cov_a)
    eig = torch.linalg.eigvalsh(sa @ cov_b @ sa).clamp_min(0)
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    return frechet_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# ------------------------------------------------------------------------------------------------ coverage


@dataclass
class Modes:
    """k-means modes of reference features: centroids [M, D], class [M], weight within class [M], radius [M]."""

    centroids: torch.Tensor
    classes: torch.Tensor
    weights: torch.Tensor
    radii: torch.Tensor


def fit_modes(feats: torch.Tensor, labels, k: int = 5, seed: int = 0) -> Modes:
    """k k-means modes per class of reference features [N, D] (definitions in the module docstring)."""
    from sklearn.cluster import KMeans

    feats, labels = feats.double().cpu(), _labels(labels, feats.shape[0])
    cents, classes, weights, radii = [], [], [], []
    for c in labels.unique().tolist():
        x = feats[labels == c]
        kc = min(k, x.shape[0])
        km = KMeans(n_clusters=kc, n_init=10, random_state=seed).fit(x.numpy())
        centre, assign = torch.from_numpy(km.cluster_centers_), torch.from_numpy(km.labels_).long()
        cents.append(centre)
        classes.append(torch.full((kc,), c))
        weights.append(torch.bincount(assign, minlength=kc).double() / x.shape[0])
        radii.append((x - centre[assign]).norm(dim=1).max().expand(kc))
    return Modes(torch.cat(cents), torch.cat(classes), torch.cat(weights), torch.cat(radii))


def coverage_from_features(feats: torch.Tensor, labels, modes: Modes) -> float:
    """Mean over the classes in ``labels`` of the weight of that class's modes that are hit (module docstring)."""
    feats, labels = feats.double().cpu(), _labels(labels, feats.shape[0])
    dist = torch.cdist(feats, modes.centroids)  # [N, M]
    nearest = dist.argmin(1)
    ok = (modes.classes[nearest] == labels) & (
        dist.gather(1, nearest[:, None]).squeeze(1) <= modes.radii[nearest]
    )
    hit = torch.zeros(len(modes.classes), dtype=torch.double)
    hit[nearest[ok]] = 1.0
    per_class = [(hit * modes.weights)[modes.classes == c].sum() for c in labels.unique().tolist()]
    return float(torch.stack(per_class).mean()) if per_class else 0.0


# ----------------------------------------------------------------------------------------------- diversity


def _mean_pairwise(x: torch.Tensor) -> float:
    n = x.shape[0]
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))


def class_spread(feats: torch.Tensor, labels) -> dict[int, float]:
    """{class: mean pairwise feature distance among its samples} for classes with >= 2 samples."""
    feats, labels = feats.double().cpu(), _labels(labels, feats.shape[0])
    return {
        c: _mean_pairwise(feats[labels == c]) for c in labels.unique().tolist() if (labels == c).sum() >= 2
    }


def diversity_from_features(feats: torch.Tensor, labels, reference_spread: dict[int, float]) -> float:
    """Mean over classes of (generated spread / reference spread); NaN if no class has >= 2 images."""
    ratios = [
        s / reference_spread[c] for c, s in class_spread(feats, labels).items() if c in reference_spread
    ]
    return sum(ratios) / len(ratios) if ratios else float("nan")


# ------------------------------------------------------------------------------------ image-level functions


def _reference(reference_images01, reference_labels=None, need_labels=True):
    """The given reference set, or the held-out split (in [0, 1]) when none is given."""
    if reference_images01 is None:
        from ..digits.data import load_split

        x, y = load_split("test")
        return (x + 1) / 2, y
    if need_labels and reference_labels is None:
        raise ValueError("reference_labels are required with reference_images01")
    return reference_images01, reference_labels


def prompt_accuracy(classifier: DigitClassifier, images01: torch.Tensor, labels) -> float:
    """Fraction of images classified as their prompted digit."""
    _, preds = extract_features(classifier, images01)
    return float((preds == _labels(labels, preds.shape[0])).float().mean())


def fd_digits(classifier: DigitClassifier, images01: torch.Tensor, reference_images01=None) -> float:
    """FD-digits: Fréchet distance of classifier features, generated vs reference (default: held-out split)."""
    ref, _ = _reference(reference_images01, need_labels=False)
    return frechet_distance(extract_features(classifier, images01)[0], extract_features(classifier, ref)[0])


def per_class_coverage(
    classifier: DigitClassifier,
    images01: torch.Tensor,
    labels,
    reference_images01=None,
    reference_labels=None,
    k: int = 5,
    seed: int = 0,
) -> float:
    """Mode coverage per class, averaged (module docstring); reference defaults to the held-out split."""
    ref, ref_y = _reference(reference_images01, reference_labels)
    modes = fit_modes(extract_features(classifier, ref)[0], ref_y, k=k, seed=seed)
    return coverage_from_features(extract_features(classifier, images01)[0], labels, modes)


def within_class_diversity(
    classifier: DigitClassifier,
    images01: torch.Tensor,
    labels,
    reference_images01=None,
    reference_labels=None,
) -> float:
    """Within-class feature spread relative to the reference (module docstring); 0 for copies, ~1 for real."""
    ref, ref_y = _reference(reference_images01, reference_labels)
    spread = class_spread(extract_features(classifier, ref)[0], ref_y)
    return diversity_from_features(extract_features(classifier, images01)[0], labels, spread)


def fd_pixels(images01: torch.Tensor, reference_images01=None) -> float:
    """FD-pixels: Fréchet distance of native 8x8 pixel features, generated vs reference (default: held-out)."""
    ref, _ = _reference(reference_images01, need_labels=False)
    return frechet_distance(pixel_features(images01), pixel_features(ref))


BASIC_KEYS = ("fd_digits", "prompt_accuracy", "coverage", "diversity")
METRIC_KEYS = (
    "fd_digits",
    "fd_pixels",
    "kid_digits",
    "kid_digits_std",
    "kid_pixels",
    "kid_pixels_std",
    "precision",
    "recall",
    "prompt_accuracy",
    "coverage",
    "diversity",
)


class DigitsEvaluator:
    """All digit metrics against a fixed reference, with the classifier and reference statistics cached.

    ``evaluator(images01, labels)`` -> {key: value for key in ``BASIC_KEYS``}, or for every key in ``METRIC_KEYS``
    (adding FD-pixels, KID in both spaces, precision and recall) with ``all_metrics=True``, as the digits bench asks
    (definitions in the module docstring).

    Args:
        classifier: a ``DigitClassifier`` or a path to one (default: the shipped classifier).
        reference_images01, reference_labels: the reference set (default: the held-out split).
        k, seed: modes per class for coverage.
        pr_k: the neighbour for precision/recall's radii.
        all_metrics: every metric of ``METRIC_KEYS`` rather than the four of ``BASIC_KEYS``.
    """

    def __init__(
        self,
        classifier: DigitClassifier | str | Path = DEFAULT_PATH,
        reference_images01: torch.Tensor | None = None,
        reference_labels=None,
        k: int = 5,
        seed: int = 0,
        device: str | torch.device = "cpu",
        pr_k: int = PR_K,
        all_metrics: bool = False,
    ):
        if not isinstance(classifier, DigitClassifier):
            classifier = load_classifier(classifier, device=device)
        self.classifier = classifier
        ref, ref_y = _reference(reference_images01, reference_labels)
        feats, _ = extract_features(classifier, ref)
        self.reference_stats = gaussian_stats(feats)
        self.modes = fit_modes(feats, ref_y, k=k, seed=seed)
        self.reference_spread = class_spread(feats, ref_y)
        self.reference_features = feats
        self.reference_pixels = pixel_features(ref)
        self.reference_pixel_stats = gaussian_stats(self.reference_pixels)
        self.pr_k, self.all_metrics = pr_k, all_metrics
        self.reference_radii = knn_radii(feats, pr_k) if all_metrics else None

    def __call__(self, images01: torch.Tensor, labels) -> dict[str, float]:
        feats, preds = extract_features(self.classifier, images01)
        labels = _labels(labels, feats.shape[0])
        basic = {
            "fd_digits": frechet_from_stats(*gaussian_stats(feats), *self.reference_stats),
            "prompt_accuracy": float((preds == labels).float().mean()),
            "coverage": coverage_from_features(feats, labels, self.modes),
            "diversity": diversity_from_features(feats, labels, self.reference_spread),
        }
        if not self.all_metrics:
            return basic
        pixels = pixel_features(images01)
        kid_digits, kid_digits_std = kid(feats, self.reference_features)
        kid_pixels, kid_pixels_std = kid(pixels, self.reference_pixels)
        precision, recall = precision_recall(
            feats, self.reference_features, self.pr_k, b_radii=self.reference_radii
        )
        more = {
            "fd_pixels": frechet_from_stats(*gaussian_stats(pixels), *self.reference_pixel_stats),
            "kid_digits": kid_digits,
            "kid_digits_std": kid_digits_std,
            "kid_pixels": kid_pixels,
            "kid_pixels_std": kid_pixels_std,
            "precision": precision,
            "recall": recall,
        }
        return {k: {**basic, **more}[k] for k in METRIC_KEYS}
