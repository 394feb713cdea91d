"""A VGG16 perceptual distance for YONOS-SR's decoder stage, from a local weights file (offline: nothing downloads).

The network is torchvision's ``vgg16().features`` up to relu3_3 (same layer indices, so torchvision's state dict
``vgg16-397923af.pth`` loads as it is: keys ``features.N.weight`` or ``N.weight``); inputs in [-1, 1] are mapped to
ImageNet normalisation; the distance is the mean squared difference of the relu1_2, relu2_2 and relu3_3 features,
each averaged over its elements.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision's vgg16 "D" configuration up to relu3_3: conv widths, "M" = max-pool
LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256)
TAPS = (3, 8, 15)  # indices of relu1_2, relu2_2, relu3_3 in ``features``
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VGGPerceptual(nn.Module):
    """Frozen VGG16 features; ``forward(x, y)`` is the perceptual distance of two image batches in [-1, 1]."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for v in LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGGPerceptual:
        """Load ``path`` (a torch state dict, .pth/.pt, or .safetensors) of torchvision's vgg16 (or its features)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"yonos.perceptual_weights: {path} is not a file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        model = cls()
        wanted = model.features.state_dict()
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"{path} is not a VGG16 state dict: missing {missing[:4]}")
        model.features.load_state_dict({k: state[k] for k in wanted})
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float().add(1).div(2).sub(self.mean).div(self.std)
        h = h.to(self.features[0].weight.dtype)  # frozen: the trainer may hold it in half precision
        total = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                a, b = h.chunk(2)
                total = total + (a - b).float().square().mean()
            if i >= TAPS[-1]:
                break
        return total
