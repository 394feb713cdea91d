"""SiD on the analytic Gaussian-mixture teacher (DESIGN §3): the set-ups behind tests/methods/test_sid_gmm.py.

**Students** (``train_and_evaluate``): the problem, networks and pretraining of ``bench_gmm`` (4 classes x 2
neighbouring modes in 2-D; a 7-layer MLP generator and a 3-layer eps fake score, both pretrained by denoising on
GMM samples as SiD starts them from the teacher), trained with the real ``SiD`` method and ``Trainer`` against the
exact conditional denoiser (no CFG), then scored per step count k with exact NLL, mode coverage and sliced W2.
Choices, measured on this problem:

- Adam (0, 0.999) as the reference: β1 = 0.9 made the mode width swing by ±40% within 1k iterations.
- t ~ U[5, 600) (as the DMD2 set-up: the fake score's x0 error grows like σ/α at large t) and lr 3e-4 for both
  networks: at 1e-3 / 5e-4 the NLL excess jumped between -13% and +18% from one 500-iteration check to the next,
  at 3e-4 it fell steadily to +1.8..+6.3% (seeds 0-3) at 4000 iterations. The excess is mostly "tear" samples
  between a class's two modes (a one-step generator is a continuous map of the noise).
- Few-step (K = 4 from t = 999): each k trains the generator's last step only a quarter of the time, and only the
  mixture of the k-step outputs is matched, so per-k errors can offset each other (early on k = 4 is too narrow,
  k = 1 has tears). lr 5e-4, gradient clipping at 5 and batch 512 for 6000 iterations: at batch 256 the per-k NLL
  still swung by ±15% between checks after 5000 iterations; at 512 it converged steadily (all k within 5% at 6000).

**Guidance** (``guidance_experiment``): a conditional GMM where CFG costs diversity. 3 classes, each with an outer
mode of its own and an inner mode; the three inner modes sit 4 std apart around the origin, so p(c|x) < 1 there.
Teacher CFG climbs p(c|x) and drains the inner modes (the teacher itself, DDIM 50 steps, keeps 21% / 4.5% of a
class in its inner mode at w = 2 / 3 against 47% in the data); Zero- and Anti-CFG guide through the generator's own
class posterior, which stops pushing once the generator's classes are apart.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time

import torch

from ..config import OptimizerConfig
from ..methods.sid import SiD, SiDConfig
from ..models.gmm import GMM
from .gmm_metrics import gmm_report, mode_coverage, mode_weight_error
from .gmm_setup import DIM, NUM_CLASSES, networks, null_labels, paired_gmm, train

STD = 0.3


def train_sid(
    gmm: GMM, num_classes: int, cfg: SiDConfig, steps: int, seed: int, out_dir: str, batch: int = 256
):
    """Pretrain the networks, then train SiD with the Trainer for ``steps`` iterations; EMA weights at the end."""
    teacher, fake, generator = networks(gmm, num_classes, seed)
    gen_params, fake_params = dict(generator.named_parameters()), dict(fake.named_parameters())
    method = SiD(generator, fake, teacher, cfg, (gmm.dim,), gen_params, fake_params, null_labels, seed=seed)
    train(method, cfg, num_classes, steps, batch, seed, out_dir)
    return method


def student_config(num_steps: int, lr: float, max_grad_norm: float | None = None) -> SiDConfig:
    return SiDConfig(
        guidance="cfg",
        guidance_scale=1.0,  # the exact conditional teacher: the student must match p(x | c)
        num_steps=num_steps,
        init_timestep=999,
        min_step=5,
        max_step=600,
        generator_lr=lr,
        fake_lr=lr,
        optim=OptimizerConfig(betas=[0.0, 0.999], max_grad_norm=max_grad_norm),
        ema_decay=0.999,
    )


def train_and_evaluate(num_steps: int = 1, seed: int = 0, per_class: int = 5000) -> dict[int, dict]:
    """SiD students on ``bench_gmm``'s paired GMM: {k: gmm_report of the k-step samples} for k = 1..num_steps."""
    start = time.perf_counter()
    gmm = paired_gmm()
    if num_steps == 1:
        cfg, steps, batch = student_config(1, 3e-4), 4000, 256
    else:
        cfg, steps, batch = student_config(num_steps, 5e-4, max_grad_norm=5.0), 6000, 512
    with tempfile.TemporaryDirectory() as tmp:
        method = train_sid(gmm, NUM_CLASSES, cfg, steps, seed, tmp, batch)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(1234))
    reports = {}
    for k in range(1, num_steps + 1):
        r = reports[k] = gmm_report(method.generate(noise, labels, timesteps=k), gmm, labels)
        rel = (r["nll"] - r["nll_true"]) / abs(r["nll_true"])
        print(
            f"SiD K={num_steps} at k={k} ({steps} iterations): nll={r['nll']:.4f} "
            f"nll_true={r['nll_true']:.4f} ({rel:+.2%}), mode_coverage={r['mode_coverage']:.3f}, "
            f"mode_weight_error={r['mode_weight_error']:.4f}, sw2={r['sw2']:.4f}"
        )
    print(f"({time.perf_counter() - start:.0f} s wall)")
    return reports


# --- guidance variants ------------------------------------------------------------------------------------------
def triangle_gmm(inner_side: float = 4.0, outer_radius: float = 4.0, inner_weight: float = 0.5) -> GMM:
    """3 classes: class c owns an outer mode (radius ``outer_radius``) and an inner mode; the inner modes form a
    triangle of side ``inner_side`` std around the origin. Components 0-2 are outer, 3-5 inner."""
    angle = 2 * math.pi * torch.arange(3, dtype=torch.float32) / 3
    r_in = inner_side * STD / math.sqrt(3)
    means = torch.cat(
        [
            torch.stack([outer_radius * angle.cos(), outer_radius * angle.sin()], 1),
            torch.stack([r_in * angle.cos(), r_in * angle.sin()], 1),
        ]
    )
    weights = torch.tensor([1 - inner_weight] * 3 + [inner_weight] * 3)
    return GMM(weights, means, STD, classes=torch.tensor([0, 1, 2, 0, 1, 2]))


def guidance_report(samples: torch.Tensor, labels: torch.Tensor, gmm: GMM) -> dict:
    """Prompt adherence (share of samples whose most likely component is of their class), within-class coverage
    (modes with at least half their expected share), mode-weight error (TV), the share in each class's inner mode."""
    comp = gmm.responsibilities(samples).argmax(1)
    own = gmm.classes[comp] == labels
    return {
        "adherence": float(own.float().mean()),
        "coverage": mode_coverage(samples, gmm, labels, min_fraction=0.5),
        "mode_weight_error": mode_weight_error(samples, gmm, labels),
        "inner_share": float(((comp >= 3) & own).float().mean()),
        "nll": float(-gmm.log_prob(samples, labels).mean()),
    }


def guidance_config(guidance: str, **kw) -> SiDConfig:
    return dataclasses.replace(student_config(1, 3e-4), guidance=guidance, **kw)


def guidance_experiment(
    variants: dict[str, SiDConfig], steps: int = 2000, seed: int = 0, per_class: int = 2000
):
    """Train one 1-step student per variant on ``triangle_gmm`` (same seed and set-up) and report each."""
    gmm = triangle_gmm()
    labels = torch.arange(3).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(1234))
    out = {}
    for name, cfg in variants.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            method = train_sid(gmm, 3, cfg, steps, seed, tmp)
        r = out[name] = guidance_report(method.generate(noise, labels), labels, gmm)
        print(
            f"SiD {name}: adherence={r['adherence']:.3f}, coverage={r['coverage']:.3f}, "
            f"mode_weight_error={r['mode_weight_error']:.4f}, inner_share={r['inner_share']:.3f}, "
            f"nll={r['nll']:.3f} ({time.perf_counter() - start:.0f} s)"
        )
    truth = gmm.sample(len(labels), labels, generator=torch.Generator().manual_seed(0))[0]
    out["data"] = guidance_report(truth, labels, gmm)
    print(f"data: {out['data']}")
    return out
