"""The analytic Gaussian-mixture problem shared by the GMM harnesses (``bench_gmm``: DMD2 and the bench table;
``sid_gmm``: SiD; ``agd_gmm``: AGD): the paired mixture, the student / fake-score networks and their denoising
pretraining, and training a method on it with the real ``Trainer``. Why each choice: ``bench_gmm``'s docstring.
"""

from __future__ import annotations

import math

import torch

from .. import schedule
from ..config import TrainConfig
from ..models.gmm import GMM, GMMDenoiser, MLPDenoiser, scaled_linear_alphas_cumprod
from ..trainer import Trainer, make_accelerator

NUM_CLASSES, MODES_PER_CLASS, DIM, STD = 4, 2, 2, 0.3


def paired_gmm(num_classes: int = NUM_CLASSES) -> GMM:
    """2 x num_classes modes on a circle, neighbours 8 std apart; class c owns the neighbouring modes 2c and 2c+1."""
    K = num_classes * MODES_PER_CLASS
    radius = 8 * STD / (2 * math.sin(math.pi / K))
    angle = 2 * math.pi * torch.arange(K, dtype=torch.float32) / K
    means = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    weights = torch.softmax(0.5 * torch.randn(K, generator=torch.Generator().manual_seed(0)), dim=0)
    return GMM(weights, means, STD, classes=torch.arange(K) // MODES_PER_CLASS)


def null_labels(n: int) -> torch.Tensor:
    """The unconditional input of a batch of n: label -1."""
    return torch.full((n,), -1, dtype=torch.long)


def pretrain_denoiser(net: MLPDenoiser, gmm: GMM, acp: torch.Tensor, steps: int, seed: int) -> None:
    """Denoising pretraining on GMM samples in the net's own parametrisation, 10% null labels (for CFG)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        x0, labels, _ = gmm.sample(256, generator=g)
        labels = torch.where(torch.rand(256, generator=g) < 0.1, -1, labels)
        t = torch.randint(0, len(acp), (256,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t, acp)
        target = schedule.target_for(net.prediction_type, x0, eps, t, acp)
        loss = ((net.native(x_t, t, labels) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def networks(gmm: GMM, num_classes: int, seed: int, pretrain_steps: int = 800):
    """(exact teacher, fake score, generator) under ``torch.manual_seed(seed)``: a 3-layer eps fake score and a
    7-layer x0 generator, both pretrained by denoising on GMM samples (as methods start them from the teacher)."""
    torch.manual_seed(seed)
    acp = scaled_linear_alphas_cumprod()
    fake = MLPDenoiser(
        acp, dim=gmm.dim, num_classes=num_classes, hidden=128, depth=3, prediction_type="epsilon"
    )
    generator = MLPDenoiser(
        acp, dim=gmm.dim, num_classes=num_classes, hidden=128, depth=7, prediction_type="sample"
    )
    pretrain_denoiser(fake, gmm, acp, steps=pretrain_steps, seed=seed + 1)
    pretrain_denoiser(generator, gmm, acp, steps=pretrain_steps, seed=seed + 2)
    return GMMDenoiser(gmm, acp), fake, generator


def train(method, section, num_classes: int, steps: int, batch: int, seed: int, out_dir: str, batch_fn=None):
    """Train ``method`` (config ``section``) with the real Trainer for ``steps`` iterations on class labels drawn
    per batch (or ``batch_fn``); EMA weights (where kept) are copied in at the end."""
    run = TrainConfig(
        method=method.name,
        teacher="analytic-gmm",
        output_dir=out_dir,
        seed=seed,
        max_steps=steps,
        train_batch_size=batch,
        checkpointing_steps=10**9,  # (the trainer still writes one checkpoint at the end)
        report_to="none",
        export=False,
        section=section,
    )

    def labels(step, micro, g):
        return {"cond": torch.randint(0, num_classes, (batch,), generator=g)}

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # an earlier run in this process may have used another precision
    trainer = Trainer(method, run, batch_fn or labels, accelerator=make_accelerator(run))
    trainer.fit()
    trainer.use_ema_weights()
    return trainer
