"""``fastdiff bench quality --gmm``: the analytic Gaussian-mixture teacher, where quality is exact.

Rows: the exact teacher sampled with DDIM at 1, 2, 4, 8, 25 steps, a 1-step DMD2 student (an MLP) trained with
the real DMD2 method and Trainer, and SiD students (1-step, and K=4 at each k; set-ups in ``sid_gmm``). Metrics: exact NLL next to the NLL of true samples, mode coverage, per-mode weight
error, sliced W2. tests/methods/test_dmd2_gmm.py asserts on the same set-up. Why each choice:

- **Problem.** 4 classes x 2 modes in 2-D, std 0.3, mildly non-uniform weights (as ``GMM.random``). Modes on a
  circle whose radius puts neighbours exactly 8 std apart (``GMM.random``'s minimum separation, overlap ~1e-5);
  each class owns two *neighbouring* modes. A one-step generator is a continuous map of Gaussian noise, so
  splitting a class into two modes leaves a thin "tear" of samples between them, and a tear sample's NLL grows
  with the square of the gap. ``GMM.random`` interleaves the classes, so a class's two modes sit on opposite
  sides of the circle (~27 std apart): a sample half-way costs ~90 nats, and 1% of them alone exceed the
  whole 10% budget (~0.1 nats). There a student reached NLL 3-5 against 1.04.
- **Generator**: ``MLPDenoiser(prediction_type="sample")``, 7 hidden layers (a steep tear needs depth: with 3
  layers 7-10% of the samples stayed > 4 std from their mode after 4-6k iterations), initialised by denoising
  pretraining on GMM samples, as DMD2 initialises its generator from the teacher. From a random init each
  class first collapses onto one of its modes (a local minimum of the reverse KL) and escapes only after
  1-3k iterations, depending on the seed.
- **Fake score**: an eps-prediction ``MLPDenoiser`` initialised by a short denoising pretraining on GMM samples
  (DMD2 initialises it from the teacher).
- **DMD2 hyperparameters.** t ~ U[5, 600] for the distribution-matching gradient: read through eps, the fake
  score's x0 error grows like sigma/alpha (13x at t=980), so t > 600 adds mostly noise, while the balance
  between a class's two modes is already set at t <= 600 (sigma/alpha = 2.3 there, the gap is 2.4); the small t
  pull the tear samples onto the modes (min_step 5 instead of 20: NLL excess +1.4..+4.4% over 6 seeds, against
  +0.4..+9.3% over 5). lr 1e-3 for both networks (2e-3 converges faster but the mode width then wanders by
  +-7%, i.e. +-15% in NLL); 4 fake-score updates per generator update; generator EMA (without it the NLL
  excess was +14..+17% at min_step 20).
- **LoRA fake score** (``fake_lora=(rank, alpha)``; off by default): the same pretrained fake MLP frozen, with a peft
  LoRA adapter on every Linear layer (hidden layers, output, time MLP) as the only trainable part, as DMD2's
  shared-base mode trains its fake score; compared with the full fake score by ``compare_fake_scores``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..config import OptimizerConfig
from ..methods.dmd2 import DMD2, DMD2Config
from ..methods.ode_pairs import ode_sample
from ..models.denoiser import CFG
from ..models.gmm import GMM, GMMDenoiser, scaled_linear_alphas_cumprod
from .gmm_metrics import gmm_report
from .gmm_setup import DIM, MODES_PER_CLASS, NUM_CLASSES, networks, null_labels, paired_gmm, train


def train_and_evaluate(
    tmp_path,
    seed: int = 0,
    max_steps: int = 6000,
    ema_decay: float | None = 0.999,
    pretrain_steps: int = 800,
    per_class: int = 5000,  # evaluation samples per class: two sets of 8000 true samples differ by ~2% in nll
    fake_lora: tuple[int, float] | None = None,
    fake_lr: float = 1e-3,
) -> dict:
    """Pretrain fake score and generator, train DMD2 with the Trainer, print and return ``gmm_report``.

    ``fake_lora=(rank, alpha)`` trains a LoRA adapter on the frozen pretrained fake score instead of all of it."""
    start, cpu_start = time.perf_counter(), time.process_time()
    gmm = paired_gmm()
    teacher, fake, generator = networks(gmm, NUM_CLASSES, seed, pretrain_steps)
    real = CFG(teacher, 1.0, null_labels)  # the exact teacher, conditional
    cfg = DMD2Config(
        guidance_scale=1.0,
        student_timesteps=[999],
        min_step=5,
        max_step=600,
        generator_lr=1e-3,
        fake_lr=fake_lr,
        dfake_gen_update_ratio=4,
        optim=OptimizerConfig(weight_decay=0.01, max_grad_norm=10.0),
        ema_decay=ema_decay,
    )
    gen_params, fake_params = dict(generator.named_parameters()), dict(fake.named_parameters())
    if fake_lora is not None:
        fake_params = lora_on_mlp(fake, *fake_lora)
    method = DMD2(generator, fake, real, cfg, (DIM,), gen_params, fake_params)
    train(method, cfg, NUM_CLASSES, max_steps, 256, seed, str(tmp_path))

    # fixed-seed evaluation over all classes
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(1234))
    samples = method.generate(noise, labels)
    report = gmm_report(samples, gmm, labels)
    rel = abs(report["nll"] - report["nll_true"]) / abs(report["nll_true"])
    fake_kind = "full" if fake_lora is None else f"LoRA r={fake_lora[0]} alpha={fake_lora[1]}"
    print(
        f"\nDMD2 1-step on the analytic GMM ({NUM_CLASSES} classes x {MODES_PER_CLASS} modes, {DIM}-D, "
        f"fake score {fake_kind}, seed {seed}, "
        f"{max_steps} iterations, {len(labels)} eval samples): "
        f"nll={report['nll']:.4f} nll_true={report['nll_true']:.4f} (rel. diff {rel:.2%}), "
        f"mode_coverage={report['mode_coverage']:.3f}, mode_weight_error={report['mode_weight_error']:.4f}, "
        f"sw2={report['sw2']:.4f}; {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu_start:.1f} s CPU"
    )
    return report


def lora_on_mlp(net: torch.nn.Module, rank: int, alpha: float) -> dict[str, torch.nn.Parameter]:
    """Freeze ``net`` (an ``MLPDenoiser``) and add a peft LoRA adapter (lora_B = 0: the same function at first) on
    every Linear layer; returns the adapter's parameters by name."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    net.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), net)
    return {n: p for n, p in net.named_parameters() if "lora_" in n}


FAKE_VARIANTS = {  # name -> train_and_evaluate keywords; LoRA alpha / rank = 1/8 as DMD2's SDXL r=64, alpha=8
    "full": {},
    "lora r=8 alpha=1": {"fake_lora": (8, 1.0)},
}


def compare_fake_scores(
    seeds=(0, 1, 2), variants: dict | None = None, max_steps: int = 6000, per_class: int = 5000
) -> list[dict]:
    """The DMD2 GMM set-up per seed and fake-score variant (default ``FAKE_VARIANTS``): does a LoRA fake score
    track the generator worse than a full one? Rows: seed, variant, relative NLL excess, mode coverage, weight error,
    sliced W2."""
    rows = []
    for seed in seeds:
        for name, kwargs in (variants or FAKE_VARIANTS).items():
            with tempfile.TemporaryDirectory() as tmp:
                r = train_and_evaluate(tmp, seed=seed, max_steps=max_steps, per_class=per_class, **kwargs)
            excess = (r["nll"] - r["nll_true"]) / abs(r["nll_true"])
            rows.append(
                {
                    "seed": seed,
                    "fake": name,
                    "nll_excess": excess,
                    **{k: r[k] for k in ("mode_coverage", "mode_weight_error", "sw2")},
                }
            )
    return rows


def teacher_sample(gmm: GMM, labels: torch.Tensor, steps: int, seed: int = 1234) -> torch.Tensor:
    """The exact teacher sampled with deterministic DDIM (trailing timesteps), conditional on ``labels``."""
    acp = scaled_linear_alphas_cumprod()
    x = torch.randn(len(labels), gmm.dim, generator=torch.Generator().manual_seed(seed))
    return ode_sample(GMMDenoiser(gmm, acp), x, labels, steps, acp)


def student_row(name: str, method: str, k: int, report: dict, seconds: float) -> dict:
    return {
        "system": name,
        "method": method,
        "steps": k,
        "nfe": k,
        **report,
        "latency_ms": None,
        "train_seconds": seconds,
    }


METHODS = ("dmd2", "sid")


def run(
    out: str | Path,
    n: int = 20000,
    steps=(1, 2, 4, 8, 25),
    train_steps: int = 6000,
    methods=METHODS,
) -> list[dict]:
    """Teacher rows and student rows on the analytic GMM: DMD2 1-step, SiD 1-step and SiD K=4 at each k
    (``eval/sid_gmm.py``'s set-ups); writes bench.json and bench.md to ``out``."""
    from . import sid_gmm
    from .bench_quality import write

    if n <= 0:
        raise ValueError(f"the number of samples must be positive, got {n}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown GMM bench methods {sorted(unknown)}; known: {list(METHODS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gmm = paired_gmm()
    per_class = -(-n // NUM_CLASSES)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    rows = []
    for k in steps:
        t0 = time.perf_counter()
        report = gmm_report(teacher_sample(gmm, labels, k), gmm, labels)
        ms = (time.perf_counter() - t0) * 1e3 / len(labels)
        rows.append(
            {
                "system": f"teacher-{k}",
                "method": "teacher",
                "steps": k,
                "nfe": k,
                **report,
                "latency_ms": ms,
                "train_seconds": None,
            }
        )
    if "dmd2" in methods:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:  # the trainer's checkpoint is not part of the result
            report = train_and_evaluate(tmp, max_steps=train_steps, per_class=per_class)
        rows.append(student_row("dmd2-1", "dmd2", 1, report, time.perf_counter() - t0))
    if "sid" in methods:
        for K in (1, 4):  # a one-step student, and one generator for k = 1..4 steps (the uniform mixture)
            t0 = time.perf_counter()
            reports = sid_gmm.train_and_evaluate(num_steps=K, per_class=per_class)
            seconds = time.perf_counter() - t0
            rows += [student_row(f"sid-K{K}-{k}", "sid", k, r, seconds) for k, r in reports.items()]
    write(rows, out)
    print((out / "bench.md").read_text())
    return rows
