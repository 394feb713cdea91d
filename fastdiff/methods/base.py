"""The interface between a method (the only place that knows an algorithm) and the trainer (which knows none)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Group:
    """A named set of parameters with its own optimizer, learning rate and update interval.

    The two-time-scale rule is just intervals: DMD2's ``generator`` group has ``interval=5`` and its ``critic``
    group ``interval=1``. Within an iteration groups are updated in the order ``Method.groups()`` lists them.
    """

    name: str
    params: dict[str, nn.Parameter]  # stable names: they key the checkpoint files
    lr: float
    interval: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
    extra: dict = field(default_factory=dict)


class Method(nn.Module):
    """A distillation method: declares its parameter groups, computes their losses, and samples its student.

    Methods hold networks and math only: no file paths, no accelerate, no I/O.
    """

    name = "method"
    keep_fp32: tuple[
        str, ...
    ] = ()  # submodules the trainer must not cast to half precision (e.g. EMA targets)

    def groups(self) -> list[Group]:
        raise NotImplementedError

    def loss(self, group: str, batch: dict, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named scalar loss terms for ``group`` (the trainer sums them); draw all randomness from ``generator``."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors outside the parameter groups that a resume needs (e.g. an EMA target network)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_state`` returned."""

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every diffusers model inside, replaying each forward's LoRA adapter on recomputation."""
        from ..models.lora import enable_gradient_checkpointing

        seen = set()
        for m in self.modules():
            if getattr(m, "_supports_gradient_checkpointing", False) and id(m) not in seen:
                seen.add(id(m))
                enable_gradient_checkpointing(m)

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, cond, timesteps=None, generator=None) -> torch.Tensor:
        """The student's sampler: x0 from initial noise."""
        raise NotImplementedError


def optimizer_settings(section, where: str) -> dict:
    """The AdamW settings every group of a method shares, read from its config section (named ``where``)."""
    if section.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"{where}.lr_schedule must be constant or cosine, got {section.lr_schedule!r}")
    return dict(
        betas=tuple(section.betas),
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps,
        max_grad_norm=section.max_grad_norm,
        lr_schedule=section.lr_schedule,
    )


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved (reproducible across devices)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randint(low: int, high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(device)
