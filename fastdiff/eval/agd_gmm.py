"""AGD on the analytic GMM teacher, where CFG is exact: does one adapter-guided forward match CFG over a grid of w?

Set-up (tests/methods/test_agd.py asserts on it; about 3-4 minutes on one CPU core):

- **Teacher.** 6 modes on a circle of radius 1.5, std 0.5, class = mode mod 3 (neighbouring modes 3 std apart, so
  CFG reshapes the density strongly: without guidance the conditional prediction is 26-46% off the CFG one at
  w = 2..4). The CFG prediction x0_u + w (x0_c - x0_n) is exact (``GMMDenoiser``).
- **Base.** A small conditional denoiser built like a UNet's transformer blocks: diffusers ``BasicTransformerBlock``s
  whose cross-attention (``attn2``) reads a label token (a null token for "unconditional"), x0-prediction, trained
  by regression on the exact conditional / unconditional posterior means (20% null labels), then frozen.
- **AGD.** ``GuidanceAdapters`` on its ``attn2`` blocks, trained with the real ``AGD`` method and ``Trainer`` on exact
  CFG trajectories (trailing DDIM, 25 steps, w ~ U[1, 4], 25% with a negative label) exactly as
  ``fastdiff.methods.agd.trajectories`` builds them for a UNet teacher (``cfg_trajectory``).
- **Metric.** On held-out exact-CFG trajectories at each w: relative error ||x̂0_AGD - x̂0_CFG|| / ||x̂0_CFG|| over
  all states (the prediction the adapters replace), the same for the bare base ("no guidance"), and the relative
  error of the final samples of the AGD sampler against the exact CFG sampler from the same noise.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch
from torch import nn

from .. import schedule
from ..config import OptimizerConfig
from ..methods.agd import AGD, AGDConfig, adapters_for, cfg_trajectory
from ..models.denoiser import Denoiser
from ..models.gmm import GMM, GMMDenoiser, scaled_linear_alphas_cumprod, timestep_embedding
from ..recipe import make_scheduler
from .gmm_setup import null_labels, train

NUM_CLASSES, DIM, STEPS = 3, 2, 25
W_GRID = (1.0, 2.0, 3.0, 4.0)


def overlapping_gmm() -> GMM:
    angle = 2 * math.pi * torch.arange(6, dtype=torch.float32) / 6
    means = torch.stack([1.5 * angle.cos(), 1.5 * angle.sin()], dim=1)
    return GMM(torch.ones(6), means, 0.5, classes=torch.arange(6) % NUM_CLASSES)


class CrossAttentionNet(nn.Module):
    """x_t and t -> one token -> transformer blocks with cross-attention to label tokens -> x0 (a UNet's call
    signature: ``forward(sample, timestep, encoder_hidden_states)``)."""

    def __init__(self, hidden: int = 64, depth: int = 3):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.inp = nn.Linear(DIM, hidden)
        self.time = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(hidden, 2, hidden // 2, cross_attention_dim=hidden) for _ in range(depth)
        )
        self.out = nn.Linear(hidden, DIM)
        self.labels = nn.Embedding(NUM_CLASSES + 1, hidden)  # row NUM_CLASSES: the null label (-1)

    def label_tokens(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels).long()
        return self.labels(torch.where(labels < 0, torch.full_like(labels, NUM_CLASSES), labels))[:, None]

    def forward(self, sample, timestep, encoder_hidden_states):
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        h = (self.inp(sample) + self.time(timestep_embedding(t, 64)))[:, None]
        for block in self.blocks:
            h = block(h, encoder_hidden_states=encoder_hidden_states)
        return self.out(h[:, 0])


class NetDenoiser(Denoiser):
    def __init__(self, net: CrossAttentionNet, acp):
        super().__init__(acp, "sample")
        self.net = net

    def native(self, x_t, t, cond, features=False):
        return self.net(x_t, t, encoder_hidden_states=self.net.label_tokens(cond))


def pretrain_base(den: NetDenoiser, teacher: GMMDenoiser, gmm: GMM, steps: int, seed: int) -> float:
    """Regress the exact posterior means (conditional, and unconditional for 20% null labels)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(den.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    acp = den.alphas_cumprod
    for _ in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (512,), generator=g)
        x0, _, _ = gmm.sample(512, labels, generator=g)
        labels = torch.where(torch.rand(512, generator=g) < 0.2, -1, labels)
        t = torch.randint(0, len(acp), (512,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t, acp)
        loss = ((den(x_t, t, labels) - teacher(x_t, t, labels)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    den.requires_grad_(False)
    return float(loss)


def _negatives(labels: torch.Tensor, prob: float, g: torch.Generator) -> torch.Tensor:
    other = (labels + 1 + torch.randint(0, NUM_CLASSES - 1, labels.shape, generator=g)) % NUM_CLASSES
    return torch.where(torch.rand(labels.shape, generator=g) < prob, other, torch.full_like(labels, -1))


def train_and_evaluate(
    tmp_path=None, seed: int = 0, base_steps: int = 1500, agd_steps: int = 3000, n_eval: int = 1000
) -> dict:
    """Pretrain the base, sample exact CFG trajectories, train AGD with the Trainer, and measure (see the module)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    acp = scaled_linear_alphas_cumprod()
    gmm = overlapping_gmm()
    teacher = GMMDenoiser(gmm, acp)
    net = CrossAttentionNet()
    base = NetDenoiser(net, acp)
    base_loss = pretrain_base(base, teacher, gmm, base_steps, seed + 1)
    ddim = make_scheduler(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        kwargs={"prediction_type": "sample", "timestep_spacing": "trailing", "clip_sample": False,
                "set_alpha_to_one": False},
    )  # fmt: skip

    def trajectories(n, w, labels, negative, g):
        noise = torch.randn(n, DIM, generator=g)
        return cfg_trajectory(
            teacher.native, make_scheduler(ddim), noise, labels, negative, w, STEPS, g
        ), noise

    g = torch.Generator().manual_seed(seed + 2)
    n = 4096
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    w = 1 + 3 * torch.rand(n, generator=g)
    negative = _negatives(labels, 0.25, g)
    data, _ = trajectories(n, w, labels, negative, g)
    records = {
        "x_t": data["x_t"].reshape(-1, DIM),
        "t": data["t"].repeat(n),
        "target": data["target"].reshape(-1, DIM),
        "w": w.repeat_interleave(STEPS),
        "cond": labels.repeat_interleave(STEPS),
        "negative": negative.repeat_interleave(STEPS),
    }

    agd = AGDConfig(
        hidden_dim=32, mlp_ratio=2.0, w_min=1.0, w_max=4.0, lr=1e-3,
        optim=OptimizerConfig(warmup_steps=100, lr_schedule="cosine", max_grad_norm=1.0),
        num_inference_steps=STEPS, guidance_scale=2.0,
    )  # fmt: skip
    adapters = adapters_for(net, agd).attach(net)
    method = AGD(base, adapters, agd, (DIM,), ddim, null_labels, negative_tokens=net.label_tokens)

    from ..data import sample_indices

    def batch_fn(step, micro, generator):
        idx = torch.tensor(sample_indices(len(records["t"]), 512, step, seed))
        return {k: v[idx] for k, v in records.items()}

    with tempfile.TemporaryDirectory() as tmp:
        trainer = train(method, agd, NUM_CLASSES, agd_steps, 512, seed, str(tmp_path or tmp), batch_fn)
    method.eval()

    rows = []
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for with_negative in (False, True):
            for wv in W_GRID:
                lab = torch.randint(0, NUM_CLASSES, (n_eval,), generator=g)
                neg = _negatives(lab, 1.0 if with_negative else 0.0, g)
                d, noise = trajectories(n_eval, wv, lab, neg, g)
                x, t, y = d["x_t"].reshape(-1, DIM), d["t"].repeat(n_eval), d["target"].reshape(-1, DIM)
                c, nc = lab.repeat_interleave(STEPS), neg.repeat_interleave(STEPS)
                pred = method.guided(x, t, c, wv, nc)
                adapters.detach()
                bare = base.native(x, t, c)
                adapters.attach(net)
                ours = method.generate(noise, lab, guidance_scale=wv, negative=neg)
                rows.append(
                    {
                        "w": wv,
                        "negative": with_negative,
                        "rel_err": float((pred - y).norm() / y.norm()),
                        "rel_err_no_guidance": float((bare - y).norm() / y.norm()),
                        "final_state_rel_err": float((ours - d["sample"]).norm() / d["sample"].norm()),
                    }
                )
    report = {
        "rows": rows,
        "base_loss": base_loss,
        "agd_loss": trainer.last_terms.get("adapters/mse"),
        "adapter_parameters": sum(p.numel() for p in adapters.parameters()),
        "base_parameters": sum(p.numel() for p in net.parameters()),
        "seconds": time.perf_counter() - start,
    }
    for r in rows:
        print(
            f"w={r['w']:.1f} negative={r['negative']!s:5}  rel err {100 * r['rel_err']:.2f}%  "
            f"(no guidance {100 * r['rel_err_no_guidance']:.1f}%)  final states {100 * r['final_state_rel_err']:.2f}%"
        )
    return report
