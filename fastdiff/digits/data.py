"""scikit-learn's handwritten digits as the bundled teacher's world: images, a fixed split, and prompts.

1797 8x8 grey images (0..16) are upsampled to 32x32 RGB in [-1, 1] (white strokes on black). The split is fixed
(seeded permutation, stratified by class): 80% train, 20% held out for evaluation.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {}",
    "the number {}",
    "a scan of a handwritten {}",
    "digit {}",
    "a picture of the digit {}",
)
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
RESOLUTION = 32


def prompt_for(label: int, template: int = 0) -> str:
    """The canonical prompt of a digit (template 0), or one of its paraphrases."""
    return TEMPLATES[template % len(TEMPLATES)].format(NAMES[label])


_NAME_RE = re.compile(r"\b(" + "|".join(NAMES) + r")\b")


def label_of(prompt: str) -> int | None:
    """The digit a prompt names (its last digit word), or None for a prompt without one (e.g. "")."""
    found = _NAME_RE.findall(prompt.lower())
    return NAMES.index(found[-1]) if found else None


def balanced_prompts(n: int, template: int = 0) -> tuple[list[str], list[int]]:
    """n prompts cycling through the 10 digits (balanced), with their labels."""
    labels = [i % 10 for i in range(n)]
    return [prompt_for(y, template) for y in labels], labels


def load_split(split: str = "train", resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, res, res] in [-1, 1], labels [N]) of the fixed 'train' or 'test' split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)  # [N, 8, 8] in [0, 1]
    labels = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for c in range(10):  # stratified
        idx = np.flatnonzero(data.target == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * HELD_OUT_FRACTION))].tolist())
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    keep = torch.from_numpy(is_test if split == "test" else ~is_test)
    x = images[keep][:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous(), labels[keep]
