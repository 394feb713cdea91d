"""Evaluation classifier and digit metrics (fastdiff.digits.classifier / fastdiff.eval.metrics) on known cases."""

import pytest
import torch

from fastdiff.digits.classifier import DigitClassifier, load_classifier, reward_logprob
from fastdiff.digits.data import load_split
from fastdiff.eval.metrics import (
    DigitsEvaluator,
    fd_digits,
    frechet_distance,
    frechet_from_stats,
    per_class_coverage,
    prompt_accuracy,
    within_class_diversity,
)


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def held_out():
    x, y = load_split("test")
    return (x + 1) / 2, y  # the metrics take [0, 1]


@pytest.fixture(scope="module")
def train_real():
    x, y = load_split("train")
    return (x + 1) / 2, y


@pytest.fixture(scope="module")
def evaluator(clf):
    return DigitsEvaluator(clf)


def one_copy_per_class(x, y, copies=30):
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    return x[idx].repeat_interleave(copies, 0), y[idx].repeat_interleave(copies)


def test_classifier_held_out_accuracy(clf, held_out):
    x, y = held_out
    assert isinstance(clf, DigitClassifier) and not clf.training
    acc = float((clf(x).argmax(-1) == y).float().mean())
    assert acc >= 0.97, acc
    assert torch.allclose(clf(x[:8]), clf(x[:8, :1]))  # RGB is averaged to grey inside


def test_missing_classifier_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-classifier-here"
    with pytest.raises(FileNotFoundError, match="no-classifier-here") as err:
        load_classifier(missing)
    assert "train/classifier.py" in str(err.value)


def test_frechet_distance_known_cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift d of the same set adds exactly ||d||^2
    assert frechet_distance(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)
    assert 0 < frechet_distance(a, a + 0.1) < frechet_distance(a, a + 0.5)
    assert 0 < frechet_distance(a, 1.2 * a) < frechet_distance(a, 2 * a)
    # N(0, I) vs N(0, 4I) in D dims: D (1 + 4 - 2 * 2) = D
    eye, zero = torch.eye(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    assert frechet_from_stats(zero, eye, zero, 4 * eye) == pytest.approx(8.0)


def test_fd_digits(clf, held_out, train_real):
    x, _ = held_out
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    assert fd_digits(clf, x, x) == pytest.approx(0.0, abs=1e-6)
    real = fd_digits(clf, train_real[0])  # default reference: the held-out split
    assert real < 0.05 * fd_digits(clf, noise, x)
    assert real < fd_digits(clf, torch.roll(x, 4, dims=-1), x)


def test_prompt_accuracy(clf, held_out):
    x, y = held_out
    assert prompt_accuracy(clf, x, y) >= 0.97
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert 0.02 < prompt_accuracy(clf, x, shuffled) < 0.2


def test_coverage_and_diversity(clf, evaluator, held_out, train_real):
    x, y = held_out
    own = evaluator(x, y)
    assert set(own) == {"fd_digits", "prompt_accuracy", "coverage", "diversity"}
    assert own["coverage"] == pytest.approx(1.0) and own["diversity"] == pytest.approx(1.0)
    assert own["fd_digits"] == pytest.approx(0.0, abs=1e-6)

    real = evaluator(*train_real)  # other real digits: high coverage, real-like diversity
    assert real["coverage"] >= 0.9 and 0.8 < real["diversity"] < 1.2 and real["prompt_accuracy"] >= 0.97

    copies = evaluator(*one_copy_per_class(*train_real))  # accurate but mode-collapsed
    assert copies["prompt_accuracy"] == 1.0
    assert copies["coverage"] <= 0.4 and copies["diversity"] < 1e-6
    assert copies["fd_digits"] > 10 * real["fd_digits"]

    noise = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert evaluator(noise, torch.arange(300) % 10)["coverage"] <= 0.2

    # the image-level functions agree with the evaluator
    assert per_class_coverage(clf, *train_real) == pytest.approx(real["coverage"])
    assert within_class_diversity(clf, *train_real) == pytest.approx(real["diversity"])


def test_reward_logprob_is_differentiable(clf, held_out):
    x, y = held_out
    images = x[:16].clone().requires_grad_(True)
    r = reward_logprob(clf, images, y[:16])
    assert r.shape == (16,) and (r <= 0).all()
    r.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        assert (reward_logprob(clf, x[:16], y[:16]) > reward_logprob(clf, x[:16], (y[:16] + 1) % 10)).all()


def test_label_count_mismatch(clf, held_out):
    with pytest.raises(ValueError, match="labels"):
        prompt_accuracy(clf, held_out[0][:10], held_out[1][:9])
