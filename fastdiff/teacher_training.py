"""Helpers shared by the trainers of the bundled teachers (``fastdiff.digits.teacher``, ``fastdiff.sr.teacher``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import _to_object, merge_layers


def load_recipe(schema: type, path: str | Path | None, overrides: list[str] | tuple = ()):
    """A teacher recipe (YAML) onto the dataclass ``schema`` with ``key=value`` overrides; unknown keys and bad
    values raise ConfigError."""
    return _to_object(merge_layers(schema, path, overrides))


def lr_scale(step: int, total: int, warmup: int = 0, floor: float = 1.0) -> float:
    """Linear warm-up, then cosine from 1 down to ``floor`` (floor=1: constant)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_mb(path: str | Path) -> float:
    """The size of a folder's files in MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
