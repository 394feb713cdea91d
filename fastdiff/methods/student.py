"""The few-step student's sampler, shared by DMD2 and SiD, and what an export needs of such a student.

A student is an x0 predictor G(x, t, c) called at fixed timesteps t_0 > t_1 > ... : the first input is pure noise z
labelled t_0 (as a diffusers pipeline feeds it), and between steps the x0 is re-noised to the next timestep with
fresh, independent noise (as LCMScheduler does; re-using the previous noise gives artifacts):

    x0_i = G(x_i, t_i, c),    x_{i+1} = α(t_{i+1}) x0_i + σ(t_{i+1}) ε_i,   ε_i ~ N(0, I) fresh
"""

from __future__ import annotations

import torch

from .. import schedule
from .base import ExportedStudent, randn


def renoise(
    x0: torch.Tensor, t_next, generator: torch.Generator, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Re-noise x0 to ``t_next`` (an int or a per-sample tensor) with fresh noise drawn from ``generator``."""
    t = torch.as_tensor(t_next, device=x0.device).expand(x0.shape[0])
    return schedule.add_noise(x0, randn(x0.shape, generator, x0.device), t, alphas_cumprod)


def sample(
    net, noise: torch.Tensor, cond, timesteps, generator: torch.Generator, alphas_cumprod
) -> torch.Tensor:
    """Run the student ``net`` at ``timesteps`` from ``noise``; returns the last x0 (gradients as the caller allows)."""
    ts = [int(t) for t in timesteps]
    x = noise
    for i, t in enumerate(ts):
        x0 = net(x, torch.full((x.shape[0],), t, device=x.device), cond)
        if i + 1 < len(ts):
            x = renoise(x0, ts[i + 1], generator, alphas_cumprod)
    return x0


def exported(denoiser) -> ExportedStudent:
    """A UNet denoiser as the export's student: its named LoRA adapter, or the whole UNet."""
    adapter = denoiser.adapter if denoiser.adapter not in ("*", None) else None
    return ExportedStudent(denoiser.unet, adapter)
