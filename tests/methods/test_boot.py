"""BOOT: the bootstrap target is one teacher DDIM step in signal space, the losses vanish on the exact recursion,
the log-SNR grid, the analytic GMM (the one-step generator and the learned trajectory), and tiny SDXL end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdiff.methods.boot import BOOT, BOOTConfig, lambda_grid
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.gmm import GMMDenoiser, scaled_linear_alphas_cumprod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_e2e_tiny import REPO, launch  # noqa: E402


def _gmm_teacher():
    from fastdiff.eval.gmm_setup import paired_gmm

    return GMMDenoiser(paired_gmm(), scaled_linear_alphas_cumprod())


class Oracle(Denoiser):
    """A 'student' that returns stored signals: y[t] for the noise it was built on (prediction type "sample")."""

    def __init__(self, acp, signals: dict[int, torch.Tensor]):
        super().__init__(acp, prediction_type="sample")
        self.signals, self.dummy = signals, nn.Parameter(torch.zeros(1))

    def native(self, x_t, t, cond=None, features=False):
        last = len(self.alphas_cumprod) - 1
        return torch.stack([self.signals[last - int(u)][i] for i, u in enumerate(t)]) + 0 * self.dummy


def test_the_grid_runs_from_T_to_0_evenly_in_log_snr():
    acp = scaled_linear_alphas_cumprod()
    grid = lambda_grid(acp, 16)
    assert grid[0] == 999 and grid[-1] == 0 and all(a > b for a, b in zip(grid, grid[1:]))
    lam = 0.5 * (acp / (1 - acp)).log()
    steps = [float(lam[b] - lam[a]) for a, b in zip(grid, grid[1:])]
    assert max(steps[:8]) / min(steps[:8]) < 1.1  # even where integer timesteps allow it
    with pytest.raises(ValueError, match="grid_size"):
        lambda_grid(acp, 1)


def test_bootstrap_target_is_one_teacher_ddim_step_written_out():
    teacher = _gmm_teacher()
    acp = teacher.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    y_t, noise = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    t, s = torch.full((6,), 600), torch.full((6,), 520)
    method = BOOT(Oracle(acp, {}), teacher, BOOTConfig(grid_size=8), (2,), {})
    target, d = method.bootstrap_target(y_t, noise, t, s, labels)
    # by hand: x_t from the signal, the teacher's x0 and eps there, a DDIM step to s, the signal at s
    a_t, s_t, a_s, s_s = (acp[600].sqrt(), (1 - acp[600]).sqrt(), acp[520].sqrt(), (1 - acp[520]).sqrt())
    x_t = a_t * y_t + s_t * noise
    x0 = teacher(x_t, t, labels)
    x_s = a_s * x0 + s_s * (x_t - a_t * x0) / s_t
    torch.testing.assert_close(target, (x_s - s_s * noise) / a_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d[:, 0], torch.full((6,), float(1 - a_t * s_s / (s_t * a_s))))


def test_losses_vanish_on_the_exact_recursion_and_not_elsewhere():
    """A student holding the exact signal-space DDIM recursion of the teacher from the boundary y_T = f(ε, T): both
    the bootstrap and the boundary losses are zero; perturbing one grid time makes the bootstrap loss positive."""
    teacher = _gmm_teacher()
    acp, n = teacher.alphas_cumprod, 64
    labels = torch.arange(4).repeat(n // 4)
    cfg = BOOTConfig(grid_size=12, boundary_weight=1.0)
    grid = lambda_grid(acp, cfg.grid_size)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(7))
    oracle = Oracle(acp, {})
    method = BOOT(oracle, teacher, cfg, (2,), {"dummy": oracle.dummy})
    y = teacher(noise, torch.full((n,), 999), labels)
    oracle.signals[grid[0]] = y
    for t, s in zip(grid, grid[1:]):
        y, _ = method.bootstrap_target(y, noise, torch.full((n,), t), torch.full((n,), s), labels)
        oracle.signals[s] = y

    pairs = torch.arange(n) % (len(grid) - 1)  # every grid pair
    assert float(method.bootstrap_loss(noise, pairs, labels).detach()) < 1e-9
    assert float(method.boundary_loss(noise, labels).detach()) < 1e-9
    oracle.signals[grid[5]] = oracle.signals[grid[5]] + 0.1
    assert float(method.bootstrap_loss(noise, pairs, labels).detach()) > 1e-3
    oracle.signals[grid[0]] = oracle.signals[grid[0]] + 0.1
    assert float(method.boundary_loss(noise, labels).detach()) > 1e-3


def test_gmm_one_step_generator_and_its_trajectory_match_the_exact_teacher():
    """BOOT on the analytic mixture, class labels only: the one-step generator's NLL within 15% of true samples with
    every mode covered, and g(ε, t) within 6% of the exact teacher trajectory's signal at every grid time."""
    from fastdiff.eval import boot_gmm

    r = boot_gmm.train_and_evaluate(seed=0, max_steps=1500, per_class=500)
    assert abs(r["nll_excess"]) < 0.15 and r["mode_coverage"] == 1.0, r
    assert max(r["trajectory_error_by_t"].values()) < 0.06, r["trajectory_error_by_t"]


def test_tiny_sdxl_launch_export_and_plain_diffusers_load(tiny_teachers, tmp_path):
    """`accelerate launch` on a tiny SDXL teacher (LoRA student on the shared UNet), then the export, loaded by a
    process that imports only diffusers, samples exactly what fastdiff's one-step generator gives."""
    from safetensors.torch import load_file

    from fastdiff.run import load_checkpoint_method

    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    launch(
        [
            "--config",
            str(REPO / "assets/configs/sdxl_boot_1step.yaml"),
            f"teacher={tiny_teachers['sdxl']}",
            f"prompts={prompts}",
            f"output_dir={out}",
            "max_steps=4",
            "mixed_precision=no",
            "gradient_checkpointing=false",
            "boot.optim.warmup_steps=0",
            "boot.lr=1e-3",
            "boot.ema_decay=null",
            "checkpointing_steps=4",
            "validation_steps=4",
        ]  # fmt: skip
    )
    recipe = json.loads((out / "fastdiff.json").read_text())
    assert recipe["method"] == "boot" and recipe["timesteps"] == [999] and recipe["num_inference_steps"] == 1
    dest = tmp_path / "latents.safetensors"
    subprocess.run(
        [sys.executable, str(REPO / "tests/diffusers_only_sample.py"), str(out), tiny_teachers["sdxl"], "a red square",
         str(dest)],
        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    theirs = load_file(str(dest))
    method, teacher, _ = load_checkpoint_method(out / "checkpoints/checkpoint-4")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((1, *teacher.latent_shape()), generator=gen)
    cond = teacher.encode(["a red square"])
    ours = method.generate(noise, cond)
    for name, latents in theirs.items():
        torch.testing.assert_close(latents, ours, atol=1e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # trained: the generator moved away from the teacher's one-step prediction
        start = teacher.denoiser(adapter=None)(noise, 999, cond)
    assert float((ours - start).abs().max()) > 1e-4
