"""MSD on the analytic Gaussian mixture: K students, each owning a block of classes, against one student of the same
size, at equal total iterations and equal total batch (the paper's comparison).

Problem: ``paired_gmm(8)``, 8 classes x 2 neighbouring modes in 2-D (16 modes on a circle, neighbours 8 std apart),
the exact teacher. Every student is the DMD2 GMM set-up of ``bench_gmm`` (a 7-layer x0 MLP generator and a 3-layer
eps fake score, both pretrained by denoising on the whole mixture, as students start from the teacher; DMD2 with
t ~ U[5, 600], lr 1e-3, 4 critic updates per generator update, generator EMA). MSD's ``all`` schedule: each
iteration updates every student on batch / K labels of its own classes, so K = 1 and K = 4 see the same number of
samples per iteration. Metrics (``gmm_metrics``): NLL excess over true samples' NLL, mode coverage, mode-weight
error, sliced W2, over all classes.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch

from ..config import OptimizerConfig
from ..methods.dmd2 import DMD2, DMD2Config
from ..methods.msd import MSD, MSDConfig
from ..models.denoiser import CFG
from .gmm_metrics import gmm_report
from .gmm_setup import DIM, networks, null_labels, paired_gmm, train

NUM_CLASSES = 8


def student_config(ema_decay: float | None = 0.999) -> DMD2Config:
    return DMD2Config(
        guidance_scale=1.0,
        generator="full",
        fake_score="full",
        shared_base=False,
        student_timesteps=[999],
        min_step=5,
        max_step=600,
        generator_lr=1e-3,
        fake_lr=1e-3,
        dfake_gen_update_ratio=4,
        optim=OptimizerConfig(weight_decay=0.01, max_grad_norm=10.0),
        ema_decay=ema_decay,
    )


def train_and_evaluate(
    num_students: int, seed: int = 0, max_steps: int = 6000, batch: int = 256, per_class: int = 2000
) -> dict:
    """Train MSD with ``num_students`` students (consecutive blocks of classes) and report on every class."""
    start = time.perf_counter()
    gmm = paired_gmm(NUM_CLASSES)
    teacher, fake, generator = networks(gmm, NUM_CLASSES, seed)
    real = CFG(teacher, 1.0, null_labels)
    dmd2 = student_config()
    students = []
    for _ in range(num_students):
        g, f = copy.deepcopy(generator), copy.deepcopy(fake)
        students.append(
            DMD2(g, f, real, dmd2, (DIM,), dict(g.named_parameters()), dict(f.named_parameters()))
        )
    student_of = torch.arange(NUM_CLASSES) * num_students // NUM_CLASSES  # consecutive class blocks
    cfg = MSDConfig(num_students=num_students, partition="classes", schedule="all", dmd2=dmd2)
    method = MSD(students, cfg, route=lambda labels: student_of[labels.cpu()])
    per_student = batch // num_students
    classes = [torch.nonzero(student_of == k).flatten() for k in range(num_students)]

    def batch_fn(step, micro, g):
        picks = [c[torch.randint(0, len(c), (per_student,), generator=g)] for c in classes]
        return {"cond": torch.cat(picks)}

    with tempfile.TemporaryDirectory() as tmp:
        train(method, cfg, NUM_CLASSES, max_steps, batch, seed, tmp, batch_fn)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(1234))
    report = gmm_report(method.generate(noise, labels), gmm, labels)
    report["nll_excess"] = (report["nll"] - report["nll_true"]) / abs(report["nll_true"])
    report["seconds"] = time.perf_counter() - start
    return report


def compare(seeds=(0, 1, 2), students=(1, 4), max_steps: int = 6000) -> list[dict]:
    """Rows of (seed, K, NLL excess, coverage, mode-weight error, sliced W2, seconds)."""
    rows = []
    for seed in seeds:
        for k in students:
            r = train_and_evaluate(k, seed, max_steps)
            rows.append({"seed": seed, "students": k, **{m: r[m] for m in ("nll_excess", "mode_coverage",
                         "mode_weight_error", "sw2", "seconds")}})  # fmt: skip
            print(rows[-1], flush=True)
    return rows
