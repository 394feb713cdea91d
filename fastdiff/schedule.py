"""Noise-schedule math on the teacher's discrete timesteps (pure tensor functions).

Conventions (DESIGN §2): timesteps are integer indices 0..T-1 into the teacher's ``alphas_cumprod``;
alpha_t = sqrt(acp_t), sigma_t = sqrt(1 - acp_t), x_t = alpha_t x0 + sigma_t eps, v = alpha_t eps - sigma_t x0.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alpha_sigma(acp: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t for integer timesteps ``t``, broadcast to the shape of ``like``."""
    a = acp.to(like.device)[t.to(like.device).long()]
    return _bcast(a.sqrt(), like), _bcast((1 - a).sqrt(), like)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(acp, t, x0)
    return a * x0 + s * eps


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, prediction_type: str):
    """Read a network's native output as an x0 prediction."""
    a, s = alpha_sigma(acp, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * pred) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, prediction_type: str):
    """Read a network's native output as an eps prediction."""
    a, s = alpha_sigma(acp, t, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return s * x_t + a * pred
    if prediction_type == "sample":
        return (x_t - a * pred) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(acp, t, x_t)
    return (x_t - a * x0) / s


def target_for(prediction_type: str, x0, eps, t, acp) -> torch.Tensor:
    """The regression target of a denoising loss in the network's native parametrisation."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        a, s = alpha_sigma(acp, t, x0)
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM jump to ``t_next`` given (x0, eps); t_next < 0 means the clean sample."""
    t_next = torch.as_tensor(t_next, device=x0.device).long().expand(x0.shape[0])
    a, s = alpha_sigma(acp, t_next.clamp(min=0), x0)
    clean = _bcast(t_next < 0, x0)
    return torch.where(clean.bool(), x0, a * x0 + s * eps)


def snr(acp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = acp[t.long()]
    return a / (1 - a)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing-spaced timesteps (start at T-1), as DDIM/LCM with ``timestep_spacing='trailing'`` give."""
    step = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * step)) - 1 for i in range(num_steps)]
