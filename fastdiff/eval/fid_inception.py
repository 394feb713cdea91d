"""The Inception-v3 that FID and KID are reported with, loaded from a local weights file.

The network of TensorFlow's ``inception-2015-12-05`` graph as pytorch-fid and torch-fidelity port it:
torchvision's Inception-v3 with TensorFlow's pooling (average pools that ignore padding, a max pool in the last
block) and batch-norm eps 1e-3, under their state-dict names. Its input is a uint8 RGB batch at any size, resized
to 299x299 with TensorFlow 1.x's bilinear resize and scaled by (x - 128) / 128, as torchmetrics' default FID
(torch-fidelity's ``inception-v3-compat``) does; its output is the 2048-d average-pooled features FID and KID use.
Here so that FID needs neither torchvision nor a download.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` bears the same hash) or the same tensors as ``.safetensors``. A
``.safetensors`` file is read as it is; a torch file (``.pth``/``.pt``/``.bin``) with ``weights_only=True``
(tensors only, no code). The classifier head (``fc.*``) and ``num_batches_tracked`` entries are not needed and
ignored; every other key must be present with its shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 299
FEATURES = 2048
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
MIXED = [f"Mixed_{i}" for i in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")]


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TensorFlow's: padded zeros are not averaged in
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """``max_pool``: TensorFlow's graph max-pools in the last block (``Mixed_7c``) where the paper averages."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        row, col = {"kernel_size": (1, 3), "padding": (0, 1)}, {"kernel_size": (3, 1), "padding": (1, 0)}
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


def resize_like_tensorflow1(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] floats to size x size as TensorFlow 1.x's ``resize_bilinear`` (no
    half-pixel centres): output pixel i reads input position i * in / out, between its two neighbours."""

    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[2]), axis(x.shape[3])
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * dy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * dx


class FIDInceptionV3(nn.Module):
    """uint8 images [N, 3, H, W] -> 2048-d pool features [N, 2048] (float32)."""

    num_features = FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return self.trunk(resize_like_tensorflow1(images.float()))

    @torch.no_grad()
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float images [N, 3, 299, 299] on the 0-255 scale (already resized)."""
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in MIXED:
            x = getattr(self, name)(x)
        return x.mean((2, 3))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a torch file read with ``weights_only=True``; a ``ValueError``
    naming the file for any other format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    if suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # objects beyond tensors, or not a torch file at all
            raise ValueError(
                f"{path} cannot be read as tensors only (torch.load with weights_only=True: {type(e).__name__})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
        return state
    raise ValueError(f"{path}: expected a .safetensors file or a torch file ({', '.join(TORCH_SUFFIXES)})")


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """``FIDInceptionV3`` with the weights of ``path`` (format and keys in the module docstring), in eval mode."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    net = FIDInceptionV3()
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        problems = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else "",
        ]
        raise ValueError(
            f"{path} is not an FID Inception-v3 state dict: keys {', '.join(p for p in problems if p)}"
        )
    net.load_state_dict(state, strict=False)  # strict but for num_batches_tracked, checked above
    return net.eval().requires_grad_(False)
