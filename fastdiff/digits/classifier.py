"""A small digit classifier for evaluation (prompt accuracy, FD-digits, coverage) and as a differentiable reward.

Convention: every function here takes images in **[0, 1]** (what diffusers returns with ``output_type="pt"``),
[N, 1 or 3, H, W]; RGB is averaged to grey inside and other sizes are resized to 32x32. ``load_split`` gives
[-1, 1]: convert with ``(x + 1) / 2``.

The shipped weights (``assets/eval/digits-classifier``) are made by ``python train/classifier.py``: trained on
the fixed train split of ``fastdiff.digits.data`` only, with light augmentation (small affine jitter, blur,
gaussian noise, contrast) so slightly blurry or noisy generated digits are still classified sensibly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..paths import asset

DEFAULT_PATH = asset("eval", "digits-classifier")
TRAIN_COMMAND = "python train/classifier.py --out assets/eval/digits-classifier"


class DigitClassifier(ModelMixin, ConfigMixin):
    """A 3-block CNN: 32x32 grey -> ``features`` (``feature_dim``-d, penultimate, after ReLU) -> 10 logits.

    Inputs are [N, 1|3, H, W] in [0, 1] (see module docstring).
    """

    @register_to_config
    def __init__(
        self, channels: tuple[int, ...] = (16, 32, 64), feature_dim: int = 64, num_classes: int = 10
    ):
        super().__init__()
        blocks, c_in = [], 1
        for c in channels:  # each block halves the resolution: 32 -> 16 -> 8 -> 4
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*blocks)
        side = 32 // 2 ** len(channels)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in * side * side, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images01: torch.Tensor) -> torch.Tensor:
        """[N, 1|3, H, W] in [0, 1] -> [N, 1, 32, 32] grey, centred to [-1, 1]."""
        if images01.ndim != 4 or images01.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images01.shape)}")
        x = images01.mean(1, keepdim=True)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] (the space of FD-digits, coverage and diversity)."""
        p = next(self.parameters())
        return self.fc(self.conv(self.prepare(images01.to(p.device, p.dtype))))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.head(self.features(images01))


def load_classifier(path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu") -> DigitClassifier:
    """The trained classifier from a ``save_pretrained`` folder (safetensors only), in eval mode, frozen."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"digit classifier not found at {path} (need config.json + diffusion_pytorch_model.safetensors); "
            f"train it with: {TRAIN_COMMAND}"
        )
    model = DigitClassifier.from_pretrained(str(path), use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def reward_logprob(classifier: DigitClassifier, images01: torch.Tensor, labels) -> torch.Tensor:
    """Differentiable reward r_i = log p(label_i | image_i) under the classifier, shape [N].

    Gradients flow to ``images01`` (the classifier should be in eval mode; its weights may stay frozen).
    """
    logits = classifier(images01)
    labels = torch.as_tensor(labels, device=logits.device, dtype=torch.long).reshape(-1, 1)
    return logits.log_softmax(-1).gather(1, labels).squeeze(1)


# ---------------------------------------------------------------------------------------------- training


def augment(x01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation of [N, 1, 32, 32] images in [0, 1]: random affine (rotation <= 12 deg, scale 0.9-1.1,
    shift <= 3 px), gaussian blur (sigma 0-1.2) on half, contrast 0.7-1.0, gaussian noise (std 0-0.15); clamped."""
    n = x01.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    ang, scale, shift = u(-12, 12) * math.pi / 180, u(0.9, 1.1), u(-3 / 16, 3 / 16, 2)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    x = F.grid_sample(x01, grid, align_corners=False, padding_mode="zeros")

    sigma = u(0.0, 1.2) * (torch.rand(n, generator=generator) < 0.5)  # [N], 0 = no blur
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 7] separable kernels (a delta where sigma ~ 0)
    x = x.transpose(0, 1)  # [1, N, H, W]: one group per sample
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=n)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n)
    x = x.transpose(0, 1)

    x = x * u(0.7, 1.0, 1, 1, 1)
    x = x + u(0.0, 0.15, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(
    classifier: DigitClassifier, images01: torch.Tensor, labels: torch.Tensor, batch: int = 512
) -> float:
    """Fraction of images whose argmax class equals the label."""
    was_training = classifier.training
    classifier.eval()
    preds = torch.cat(
        [classifier(images01[i : i + batch]).argmax(-1).cpu() for i in range(0, len(labels), batch)]
    )
    classifier.train(was_training)
    return float((preds == torch.as_tensor(labels).cpu()).float().mean())


def train_classifier(
    out: str | Path | None = None,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 3e-3,
    log=print,
) -> tuple[DigitClassifier, float]:
    """Train on the fixed *train* split only (seeded, CPU), report held-out accuracy, optionally save.

    Returns (classifier in eval mode, held-out accuracy). Saved with ``save_pretrained(out,
    safe_serialization=True)`` when ``out`` is given.
    """
    from .data import load_split

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    x_train = ((x_train[:, :1] + 1) / 2).contiguous()  # grey [N, 1, 32, 32] in [0, 1]
    x_test = (x_test + 1) / 2

    model = DigitClassifier()
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(y_train):.4f}")
    model.eval()
    acc = accuracy(model, x_test, y_test)
    if log:
        log(f"held-out accuracy: {acc:.4f} ({len(y_test)} images)")
    if out is not None:
        model.save_pretrained(str(out), safe_serialization=True)
        if log:
            log(f"saved to {out}")
    return model, acc
