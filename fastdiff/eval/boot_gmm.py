"""BOOT on the analytic Gaussian mixture (``gmm_setup.paired_gmm``: 4 classes x 2 modes in 2-D, the exact teacher).

The student is the DMD2 GMM set-up's generator (a 7-layer x0 MLP pretrained by denoising on the mixture, as the method
starts from the teacher), trained by BOOT with the real Trainer on class labels only (no samples). Two checks:
the one-step generator g(ε, 0) against the mixture (``gmm_report``), and the bootstrap itself: g(ε, t) at every grid
time against the exact teacher trajectory's signal y_t = (x_t - σ_t ε) / α_t from the same ε (DDIM through all
1,000 timesteps of the closed-form teacher).
"""

from __future__ import annotations

import tempfile

import torch

from .. import schedule
from ..config import OptimizerConfig
from ..methods.boot import BOOT, BOOTConfig
from ..models.denoiser import CFG
from .gmm_metrics import gmm_report
from .gmm_setup import DIM, NUM_CLASSES, networks, null_labels, paired_gmm, train


def config(**changes) -> BOOTConfig:
    kw = dict(
        guidance_scale=1.0,
        student="full",
        shared_base=False,
        grid_size=32,
        boundary_weight=1.0,
        lr=1e-3,
        ema_decay=0.999,
        optim=OptimizerConfig(max_grad_norm=10.0),
    )
    return BOOTConfig(**{**kw, **changes})


@torch.no_grad()
def exact_signals(
    teacher, noise: torch.Tensor, labels: torch.Tensor, times: list[int], boundary: bool = True
) -> dict[int, torch.Tensor]:
    """y_t = (x_t - σ_t ε) / α_t of the exact teacher's ODE (DDIM through every timestep) at ``times``.

    ``boundary``: the trajectory BOOT's targets define, which starts from its boundary y_T = f(ε, T), i.e. at
    x_T = α_T f(ε, T) + σ_T ε; otherwise from x_T = ε (they differ by α_T f(ε, T) - (1 - σ_T) ε at T)."""
    acp = teacher.alphas_cumprod
    top = torch.full((len(noise),), len(acp) - 1)
    a, s = schedule.alpha_sigma(acp, top, noise)
    x, out = (a * teacher(noise, top, labels) + s * noise) if boundary else noise, {}
    for t in range(len(acp) - 1, -1, -1):
        tv = torch.full((len(x),), t)
        if t in times:
            a, s = schedule.alpha_sigma(acp, tv, x)
            out[t] = (x - s * noise) / a
        x0 = teacher(x, tv, labels)
        x = schedule.ddim_step(x0, schedule.eps_from_x0(x0, x, tv, acp), t - 1, acp)
    return out


def train_and_evaluate(seed: int = 0, max_steps: int = 4000, per_class: int = 2000, **changes) -> dict:
    """Train BOOT, then report the one-step generator and the trajectory error at each grid time t,
    mean ||g(ε, t) - y_t|| / mean ||y_t|| over a tenth of the evaluation noise (``trajectory_error``: the largest over
    the grid below t = 900, where y_t is the image's scale; ``_by_t``: every grid time)."""
    gmm = paired_gmm()
    teacher, _, generator = networks(gmm, NUM_CLASSES, seed)
    cfg = config(**changes)
    method = BOOT(generator, CFG(teacher, 1.0, null_labels), cfg, (DIM,), dict(generator.named_parameters()))
    with tempfile.TemporaryDirectory() as tmp:
        train(method, cfg, NUM_CLASSES, max_steps, 256, seed, tmp)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(1234))
    report = gmm_report(method.generate(noise, labels), gmm, labels)
    report["nll_excess"] = (report["nll"] - report["nll_true"]) / abs(report["nll_true"])
    few = slice(0, None, 10)  # the trajectory check on every tenth sample (all classes)
    for key, boundary in (("trajectory_error", True), ("trajectory_error_from_noise", False)):
        exact = exact_signals(teacher, noise[few], labels[few], method.grid, boundary)
        with torch.no_grad():
            errors = {
                t: float(
                    (method.signal(noise[few], t, labels[few]) - y).norm(dim=1).mean() / y.norm(dim=1).mean()
                )
                for t, y in exact.items()
            }
        report[key] = max(e for t, e in errors.items() if t < 900)
        report[f"{key}_by_t"] = errors
    return report
