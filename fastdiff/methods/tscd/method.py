"""TSCD / Hyper-SD: trajectory-segmented consistency distillation (Ren et al. 2024, "Hyper-SD").

Paper only: rebuilt from the Hyper-SD paper and the PCM reference (G-U-N/Phased-Consistency-Model,
``train_pcm_lora_sd15.py``, the closest public code); Hyper-SD released no training code.

Solver: DDIM over N skip-spaced teacher timesteps (N = 40, T = 1000), Δ = T // N:
    τ_n = (n + 1) Δ - 1  (n = 0..N-1: 24, 49, ..., 999),    τ'_n = [0, τ_0, ..., τ_{N-2}]_n = max(τ_n - Δ, 0)
Segments, k per stage: edges e_j = floor(j N / k) (j = 0..k-1); solver index n belongs to e(n) = max{e_j ≤ n}.
The edge timesteps τ'_{e_j} (j ≥ 1) must be the timesteps the k-step export samples at (DDIM trailing:
T (k - i) / k - 1), so that every sampler step starts on a trained edge and lands on the next one: with T = 1000
that holds when k divides N and N divides T (N = 40: 749/499/249 at k = 4, 874/.../124 at k = 8, PCM's SDXL
setting); construction checks it (``check_segment_edges``).
    jump_e(x̂0, ε̂) = sqrt(ᾱ(τ'_e)) x̂0 + sqrt(1 - ᾱ(τ'_e)) ε̂                 (DDIM to the segment's lower edge)
One training step (per sample: n ~ U{0..N-1}, x0 a real latent, ε ~ N(0, I)):
    x_n   = α(τ_n) x0 + σ(τ_n) ε
    pred  = jump_e(n)( f_θ(x_n, τ_n) )                                         online student, no boundary scaling
    x'    = sqrt(ᾱ(τ'_n)) x̂0_T + sqrt(1 - ᾱ(τ'_n)) ε̂_T,  (x̂0_T, ε̂_T) = teacher with CFG at (x_n, τ_n), scale s
            (fixed, or s ~ U[s_lo, s_hi] per sample as PCM's w ~ U[w_min, w_max] with s = w + 1)
    target = sg[ jump_e(n)( f_θ⁻(x', τ'_n) ) ],  or x' itself when n is an edge (c_skip = 1, the boundary)
    L_CD  = mean( sqrt((pred - target)² + c²) - c )  (pseudo-Huber, elementwise)  or  MSE
f_θ⁻ is the online student under no_grad (LoRA, as PCM and LCM-LoRA do) or an EMA copy (full fine-tune, as LCM).
Stages k = 8 → 4 → 2 → 1 in one run, each continuing from the previous weights; k = 1 is LCM (every x_n jumps to
τ'_0 = 0). When a stage ends its weights are kept (``stage_weights``) and exported as that step count's own LoRA,
as Hyper-SD releases one LoRA per step count; the final (unified) weights serve the other counts.
Samplers: a k-segment student at its own k: DDIM (eta = 0, trailing timesteps) with the student's (x̂0, ε̂), the
last step returning x̂0; the unified student at any count: TCD (γ = eta = 1: x̂0, then fresh noise to the next
timestep), Hyper-SD's choice for its unified LoRA.

Optional terms (weight 0 = off):
    adversarial (PCM's adversarial consistency loss): fake = pred, real = target, both re-noised from τ'_e to
        t_adv ~ U[τ'_e, τ'_e + T/k); a head D on the frozen teacher's features (no fake score):
        student + λ_adv softplus(-D(fake)),  discriminator softplus(D(fake)) + softplus(-D(real)), the
        discriminator on the (detached) pairs of the student's update of the same step (PCM: one pair per iteration)
    reward (Hyper-SD's human feedback learning): - λ_R reward_fn(x̂0, batch), any differentiable scorer
    DMD (Hyper-SD's one-step score distillation, in the one-segment stage): λ_DMD L_DM(x) on the one-step sample
        x = f_θ(z, T-1), with a fake score trained by denoising score matching on sg(x), as DMD2
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import schedule
from ...config import OptimizerConfig, optim_field
from ...models.denoiser import CFG, Denoiser, cat_conds
from ...recipe import Recipe, StepRecipe, derive_scheduler
from .. import losses, student
from ..base import ExportedStudent, Group, Method, RunContext, optimizer_settings, randint, randn
from ..critic import Critic
from ..registry import register


@dataclass
class TSCDConfig:
    """TSCD / Hyper-SD (paper only); defaults from the PCM SD1.5 LoRA recipe where the paper gives none."""

    student: str = "lora"  # lora (adapter "student" on the teacher UNet) | full (copy + EMA target copy)
    lora_rank: int = 64
    lora_alpha: int = 8
    guidance_scale: float = 5.5  # standard CFG scale s (LCM-form w = s - 1) when no range is given
    guidance_scale_range: list[float] | None = None  # [s_lo, s_hi]: s ~ U[s_lo, s_hi] per sample (PCM: w + 1)
    num_ddim_timesteps: int = 40  # N solver steps over T (segment edges on the sampled timesteps)
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # k per stage, in training order
    stage_steps: list[int] = field(default_factory=lambda: [5000] * 4)  # per stage; the last runs on
    loss_type: str = "huber"  # huber | l2
    huber_c: float = 0.001  # PCM / LCM-LoRA SD1.5
    lr: float = 5e-6
    optim: OptimizerConfig = optim_field(weight_decay=1e-3, warmup_steps=500, max_grad_norm=1.0)
    target_ema_decay: float = 0.95  # full mode: the target network is an EMA of the student (LCM)
    ema_decay: float | None = None  # the trainer's EMA of the student weights, for export
    adversarial_weight: float = 0.0  # λ_adv; PCM's released adversarial recipes use 0.1
    discriminator_lr: float = 1e-5  # PCM's adv_lr
    reward_weight: float = 0.0  # λ_R of the reward term on the one-step sample
    reward_model: str = "auto"  # digits | DigitClassifier folder | local CLIP folder | auto (digits teacher)
    dmd_weight: float = 0.0  # DMD term in the one-segment stage; needs a fake score
    fake_lr: float = 1e-5
    dmd_min_step: int = 20
    dmd_max_step: int = 980


# --- the solver and its segments (pure functions) ------------------------------------------------------------
def solver_timesteps(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """τ_n = (n + 1) Δ - 1, Δ = T // N (PCM's DDIMSolver): [19, 39, ..., 999] for N = 50."""
    step = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * step - 1


def prev_timesteps(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """τ'_n = [0, τ_0, ..., τ_{N-2}]: where one teacher DDIM step from τ_n lands (= max(τ_n - Δ, 0))."""
    tau = solver_timesteps(num_ddim_timesteps, num_train_timesteps)
    return torch.cat([torch.zeros(1, dtype=tau.dtype), tau[:-1]])


def segment_edges(num_ddim_timesteps: int, k: int) -> torch.Tensor:
    """Solver indices of the k segments' lower edges: floor(linspace(0, N, k, endpoint=False)) = j N // k."""
    if not 1 <= k <= num_ddim_timesteps:
        raise ValueError(f"segments must be in [1, {num_ddim_timesteps}], got {k}")
    return torch.arange(k) * num_ddim_timesteps // k


def edge_of(n: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """e(n): the largest edge ≤ n, per element."""
    edges = edges.to(n.device)
    return edges[torch.searchsorted(edges, n, right=True) - 1]


def stage_segments(step: int, segments: list[int], stage_steps: list[int]) -> int:
    """The number of segments k trained at ``step``: stage i runs for stage_steps[i] steps, the last one on."""
    end = 0
    for k, steps in zip(segments, stage_steps):
        end += steps
        if step < end:
            return k
    return segments[-1]


def check_segment_edges(num_ddim_timesteps: int, segments, num_train_timesteps: int = 1000) -> None:
    """Raise a ValueError unless, for every stage k, the solver's top timestep and the segment edges τ'_{e_j}
    (j ≥ 1) are exactly the timesteps the k-step export samples at (``schedule.ddim_timesteps(k)``).

    Then each sampler step starts where the k-segment student was trained to start (a solver timestep just above a
    segment's lower edge is not) and lands on the next edge; with T = 1000 it holds when k divides N and N divides T.
    """
    N, T = num_ddim_timesteps, num_train_timesteps
    tau_prev = prev_timesteps(N, T)
    top = int(solver_timesteps(N, T)[-1])
    for k in segments:
        edges = [int(tau_prev[e]) for e in segment_edges(N, k)[1:]]  # the first segment's lower edge is 0
        sampled = schedule.ddim_timesteps(k, T)
        missing = [t for t in edges if t not in sampled]
        if missing or top != sampled[0]:
            top_note = f"; the solver's top timestep {top} is not {sampled[0]}" if top != sampled[0] else ""
            raise ValueError(
                f"tscd.num_ddim_timesteps={N}: the stage with {k} segments has edges {missing} that are not among "
                f"the timesteps its {k}-step export samples at {sampled}{top_note}; choose N so that every k in "
                f"tscd.segments divides N and N divides {T} (e.g. 40 for 8, 4, 2, 1)"
            )


def x0_eps(net: Denoiser, x_t: torch.Tensor, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from one network call: its native output read both ways (exact for eps, v and x0 prediction)."""
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
    x_t = x_t.float()
    pred = net.native(x_t, t, cond).float()
    acp, kind = net.alphas_cumprod, net.prediction_type
    return schedule.to_x0(pred, x_t, t, acp, kind), schedule.to_eps(pred, x_t, t, acp, kind)


@register
class TSCD(Method):
    """Trajectory-segmented consistency distillation on any denoisers (a UNet LoRA, a full copy, a test MLP).

    Args:
        student: f_θ, trained; its (x̂0, ε̂) are read from its native output.
        teacher: the teacher's x0 prediction with CFG included, e.g. ``CFG(teacher, s, null_cond)``.
        cfg: the TSCD section of the config.
        sample_shape: shape of one sample (C, H, W) or (D,).
        student_params: the trainable parameters of the student, by stable name.
        target: f_θ⁻ as an EMA copy of the student (full fine-tune), updated here at the start of every step with
            ``cfg.target_ema_decay``; None: the student itself under no_grad (LoRA, as PCM / LCM-LoRA).
        features: a frozen denoiser whose ``features=True`` output feeds ``head`` (the bare teacher).
        head: discriminator head for the adversarial term (its own group ``discriminator``).
        reward_fn: ``reward_fn(x0, batch) -> scalar`` to maximise (higher is better), weighted by ``reward_weight``.
        fake_score / fake_params: a trainable score of the one-step distribution for the DMD term (group
            ``fake_score``).
        keep_stage_weights: keep each stage's final student weights (``stage_weights``) for export; off for a
            full-copy student, whose export is one UNet.

    Stage weights: the first loss call of a new stage copies the student parameters the previous stage ended with
    (after its last update). These are the live weights, not the trainer's EMA: the EMA (opt-in, off in the
    recipes) runs across stage boundaries, so at a stage's end it still averages in the previous stages' weights,
    trained for other segment counts (at decay d over the last ~1 / (1 - d) steps: 1,000 at 0.999, longer than a
    digits stage), and the method does not see it. They live in ``extra_state``, so a resumed run exports the same.
    """

    name = "tscd"
    config = TSCDConfig

    def __init__(
        self,
        student: Denoiser,
        teacher: nn.Module,
        cfg: TSCDConfig,
        sample_shape: tuple[int, ...],
        student_params: dict[str, nn.Parameter],
        target: Denoiser | None = None,
        features: Denoiser | None = None,
        head: nn.Module | None = None,
        reward_fn: Callable | None = None,
        fake_score: Denoiser | None = None,
        fake_params: dict[str, nn.Parameter] | None = None,
        num_train_timesteps: int = 1000,
        keep_stage_weights: bool = True,
    ):
        super().__init__()
        if len(cfg.segments) != len(cfg.stage_steps):
            raise ValueError("tscd.segments and tscd.stage_steps need one entry per stage")
        check_segment_edges(cfg.num_ddim_timesteps, cfg.segments, num_train_timesteps)
        scales = cfg.guidance_scale_range
        if scales is not None:
            if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
                raise ValueError(f"tscd.guidance_scale_range must be [low, high], 0 < low <= high: {scales}")
            if not isinstance(teacher, CFG):
                raise ValueError("tscd.guidance_scale_range needs the teacher as a CFG(...) denoiser")
        if cfg.loss_type not in ("huber", "l2"):
            raise ValueError(f"tscd.loss_type must be huber or l2, got {cfg.loss_type!r}")
        if cfg.adversarial_weight and (head is None or features is None):
            raise ValueError("tscd.adversarial_weight > 0 needs a discriminator head and a feature network")
        if cfg.reward_weight and reward_fn is None:
            raise ValueError("tscd.reward_weight > 0 needs a reward_fn")
        if cfg.dmd_weight and fake_score is None:
            raise ValueError("tscd.dmd_weight > 0 needs a fake score")
        self.student, self.teacher, self.target = student, teacher, target
        self.keep_fp32 = ("target",) if target is not None else ()  # an EMA kept in half precision drifts
        self.features, self.head, self.reward_fn = features, head, reward_fn
        self.critic = Critic(fake_score, fake_params or {}) if fake_score is not None else None
        self.cfg = cfg
        self.sample_shape = tuple(sample_shape)
        self.num_train_timesteps = num_train_timesteps
        self._student_params = student_params
        self._target_step = 0  # the step the EMA target was last updated for (it starts as a copy)
        self.keep_stage_weights = keep_stage_weights
        self.stage_weights: dict[int, dict[str, torch.Tensor]] = {}  # k -> the k-segment stage's last weights
        self._last_segments: int | None = None  # k of the latest loss call (None: no call yet)
        # (step, [(fake, real, t_adv, cond) of each student call in that step]) for the discriminator
        self._adversarial_pairs: tuple[int, list] = (-1, [])
        N = cfg.num_ddim_timesteps
        self.register_buffer("tau", solver_timesteps(N, num_train_timesteps), persistent=False)  # τ_n
        self.register_buffer("tau_prev", prev_timesteps(N, num_train_timesteps), persistent=False)  # τ'_n

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.student.alphas_cumprod

    @property
    def generator(self) -> Denoiser:
        """The student under the name export and the validation code read."""
        return self.student

    @property
    def final_segments(self) -> int:
        """k of the weights the student holds now: the last stage trained (the recipe's last before training)."""
        return self._last_segments or self.cfg.segments[-1]

    @property
    def student_timesteps(self) -> list[int]:
        """Default sampling timesteps: trailing DDIM with as many steps as the final stage has segments."""
        return schedule.ddim_timesteps(self.cfg.segments[-1], self.num_train_timesteps)

    def groups(self) -> list[Group]:
        c = self.cfg
        common = optimizer_settings(c.optim, "tscd")
        groups = [Group("student", self._student_params, c.lr, ema_decay=c.ema_decay, **common)]
        if c.adversarial_weight:
            head = {f"head.{n}": p for n, p in self.head.named_parameters()}
            groups.append(Group("discriminator", head, c.discriminator_lr, **common))
        if c.dmd_weight:
            groups.append(Group("fake_score", self.critic.params(), c.fake_lr, **common))
        return groups

    # --- the sampler --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None, eta: float | None = None):
        """The student's sampler with its current weights (``use_stage_weights`` for a stage's own).

        eta None or 0: deterministic DDIM, x <- jump to t_{i+1} from f_θ(x, t_i), x̂0 at the end; equals diffusers'
        ``DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)``.
        eta = γ > 0: TCD, as diffusers' ``TCDScheduler.step(eta=γ)``: from f_θ(x, t_i) jump to s = floor((1 - γ)
        t_{i+1}), then re-noise to t_{i+1} with fresh noise drawn from ``generator``; the last step ends at
        s = floor((1 - γ) 0) = 0 (ᾱ_0, not the clean sample).

        ``timesteps``: a list, a step count (trailing, e.g. 1, 2, 4, 8) or None (the final stage's count).
        """
        if isinstance(timesteps, int):
            timesteps = schedule.ddim_timesteps(timesteps, self.num_train_timesteps)
        ts = list(timesteps) if timesteps is not None else self.student_timesteps
        acp = self.alphas_cumprod
        x = noise
        for i, t in enumerate(ts):
            x0, eps = x0_eps(self.student, x, t, cond)
            last = i + 1 == len(ts)
            if not eta:  # DDIM to t_{i+1}, or to the clean sample (-1: ᾱ = 1)
                x = schedule.ddim_step(x0, eps, -1 if last else ts[i + 1], acp)
                continue
            t_next = 0 if last else ts[i + 1]
            s = int((1 - eta) * t_next)
            x = schedule.ddim_step(x0, eps, s, acp)  # x_s
            if not last:
                ratio = acp[t_next] / acp[s]  # ᾱ(t_{i+1}) / ᾱ(s): forward noising from s to t_{i+1}
                z = randn(x.shape, generator, x.device) if generator is not None else torch.randn_like(x)
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * z
        return x

    @contextmanager
    def use_stage_weights(self, k: int):
        """Run a block with the k-segment stage's kept weights in the student, then put the current ones back."""
        kept = self.stage_weights[k]
        current = {n: p.detach().clone() for n, p in self._student_params.items()}
        with torch.no_grad():
            for n, p in self._student_params.items():
                p.copy_(kept[n])
        try:
            yield self
        finally:
            with torch.no_grad():
                for n, p in self._student_params.items():
                    p.copy_(current[n])

    # --- consistency distillation inside segments -----------------------------------------------------------------
    def segments_at(self, step: int) -> int:
        return stage_segments(step, list(self.cfg.segments), list(self.cfg.stage_steps))

    def _jump(self, x0, eps, e):
        """DDIM from (x̂0, ε̂) to the edge timestep τ'_e."""
        return schedule.ddim_step(x0, eps, self.tau_prev[e], self.alphas_cumprod)

    def _guided_teacher(self, x_t, t, cond, scale):
        """The teacher's x0 with CFG: its own fixed scale, or ``scale`` [n] per sample (one batched call)."""
        if scale is None:
            return self.teacher(x_t, t, cond)
        cfg, n = self.teacher, x_t.shape[0]
        both = cfg.base(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds([cfg.null_cond(n), cond]))
        uncond, cond_x0 = both.chunk(2)
        return uncond + scale.view(-1, *[1] * (x_t.ndim - 1)) * (cond_x0 - uncond)

    def _guidance_scales(self, n: int, generator, device) -> torch.Tensor | None:
        """s ~ U[s_lo, s_hi] per sample with ``guidance_scale_range``; None: the teacher's fixed scale."""
        if self.cfg.guidance_scale_range is None:
            return None
        lo, hi = self.cfg.guidance_scale_range
        u = torch.rand(n, generator=generator, device=generator.device).to(device)
        return lo + (hi - lo) * u

    def consistency_pair(self, x0_data, eps, n, cond, k: int, scale=None):
        """(pred, target, t_edge) of the segment-consistency loss for solver indices ``n`` and k segments;
        ``scale``: per-sample CFG scales of the teacher step (None: its fixed scale)."""
        acp = self.alphas_cumprod
        edges = segment_edges(self.cfg.num_ddim_timesteps, k).to(n.device)
        e = edge_of(n, edges)  # e(n)
        t_n, t_prev = self.tau[n], self.tau_prev[n]  # τ_n, τ'_n
        x_n = schedule.add_noise(x0_data.float(), eps, t_n, acp)
        pred = self._jump(*x0_eps(self.student, x_n, t_n, cond), e)  # online: no boundary scaling
        with torch.no_grad():
            x0_t = self._guided_teacher(x_n, t_n, cond, scale).float()  # CFG: uncond + s (cond - uncond)
            eps_t = schedule.eps_from_x0(x0_t, x_n.float(), t_n, acp)
            x_prev = schedule.ddim_step(x0_t, eps_t, t_prev, acp)  # one teacher DDIM step to τ'_n
            target_net = self.student if self.target is None else self.target  # f_θ⁻
            target = self._jump(*x0_eps(target_net, x_prev, t_prev, cond), e)
            at_edge = (n == e).view(-1, *[1] * (x_prev.ndim - 1))
            target = torch.where(at_edge, x_prev, target)  # boundary: c_skip = 1
        return pred, target, self.tau_prev[e]

    @torch.no_grad()
    def _track_stage(self, k: int) -> None:
        """On the first loss call of a new stage, keep the weights the previous stage ended with."""
        if self._last_segments is not None and k != self._last_segments and self.keep_stage_weights:
            self.stage_weights[self._last_segments] = {
                n: p.detach().float().cpu().clone() for n, p in self._student_params.items()
            }
        self._last_segments = k

    @torch.no_grad()
    def _update_target(self, step: int) -> None:
        """f_θ⁻ <- d f_θ⁻ + (1 - d) f_θ once per step (after the previous step's update), full mode only."""
        if self.target is None or step == self._target_step:
            return
        self._target_step = step
        for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
            p_t.copy_(torch.lerp(p_t.float(), p_s.float(), 1 - self.cfg.target_ema_decay))

    def _adversarial_inputs(self, pred, target, t_edge, k, generator):
        """PCM: re-noise fake (pred) and real (target) from τ'_e to t_adv ~ U[τ'_e, τ'_e + T/k) with one noise."""
        T = self.num_train_timesteps
        u = torch.rand(len(t_edge), generator=generator, device=generator.device).to(t_edge.device)
        t_adv = (t_edge + (u * (T // k)).long()).clamp(max=T - 1)
        acp = self.alphas_cumprod
        ratio = acp[t_adv] / acp[t_edge]  # ᾱ(t_adv) / ᾱ(τ'_e): forward noising between two noise levels
        a = ratio.sqrt().view(-1, *[1] * (pred.ndim - 1))
        s = (1 - ratio).sqrt().view_as(a)
        z = randn(pred.shape, generator, pred.device)
        return a * pred + s * z, a * target + s * z, t_adv

    def _discriminator_inputs(self, real, eps, n, cond, k, scale, step, generator):
        """(fake, real, t_adv, cond) for the discriminator: the re-noised pair of the student's call of the same
        step, in call order (PCM computes one pair per iteration for both updates; the groups of a step are
        updated student first), else a fresh pair from this batch."""
        cached_step, pairs = self._adversarial_pairs
        if cached_step == step and pairs:
            return pairs.pop(0)
        with torch.no_grad():
            pred, target, t_edge = self.consistency_pair(real, eps, n, cond, k, scale)
            return (*self._adversarial_inputs(pred, target, t_edge, k, generator), cond)

    def _logits(self, x, t, cond):
        feats = self.features.mid_features(x, t, cond)
        return self.head(feats)

    def _one_step_sample(self, cond, n, generator, device):
        """x = f_θ(z, T - 1): the one-step student sample the DMD term and the fake score see."""
        z = randn((n, *self.sample_shape), generator, device)
        return x0_eps(self.student, z, self.num_train_timesteps - 1, cond)[0]

    def loss(self, group, batch, step, generator):
        cond, real = batch["cond"], batch.get("real")
        if real is None:
            raise ValueError(
                "TSCD trains on real latents (as the PCM / LCM references do): set `dataset=<image folder>`"
            )
        c, k = self.cfg, self.segments_at(step)
        self._track_stage(k)
        n_samples, device = real.shape[0], real.device
        if group == "fake_score":  # the shared critic: denoising score matching on the one-step samples
            with torch.no_grad():
                x = self._one_step_sample(cond, n_samples, generator, device)
            return {"fake_dsm": self.critic.denoising_loss(x, cond, generator)}

        self._update_target(step)
        n = randint(0, c.num_ddim_timesteps, n_samples, generator, device)  # n ~ U{0..N-1}
        eps = randn(real.shape, generator, device)
        scale = self._guidance_scales(n_samples, generator, device)
        if group == "discriminator":
            fake_adv, real_adv, t_adv, cond = self._discriminator_inputs(
                real, eps, n, cond, k, scale, step, generator
            )
            d_loss = losses.gan_discriminator_loss(
                self._logits(fake_adv, t_adv, cond), self._logits(real_adv, t_adv, cond)
            )
            return {"gan_d": d_loss}
        if group != "student":
            raise KeyError(f"TSCD has no parameter group {group!r}")

        pred, target, t_edge = self.consistency_pair(real, eps, n, cond, k, scale)
        if c.loss_type == "huber":
            terms = {"cd": losses.pseudo_huber(pred, target, c.huber_c)}
        else:
            terms = {"cd": nn.functional.mse_loss(pred.float(), target.float())}
        if c.adversarial_weight:
            fake_adv, real_adv, t_adv = self._adversarial_inputs(pred, target, t_edge, k, generator)
            logits = self._logits(fake_adv, t_adv, cond)
            terms["gan_g"] = c.adversarial_weight * losses.gan_generator_loss(logits)
            if self._adversarial_pairs[0] != step:
                self._adversarial_pairs = (step, [])
            self._adversarial_pairs[1].append((fake_adv.detach(), real_adv.detach(), t_adv, cond))
        if c.reward_weight or (c.dmd_weight and k == 1):
            x = self._one_step_sample(cond, n_samples, generator, device)
            if c.reward_weight:
                terms["reward"] = -c.reward_weight * self.reward_fn(x, batch)
            if c.dmd_weight and k == 1:  # DMD2's distribution-matching gradient on the one-step sample
                dmd = self.critic.dmd_loss(x, self.teacher, cond, generator, c.dmd_min_step, c.dmd_max_step)
                terms["dmd"] = c.dmd_weight * dmd
        return terms

    # --- export -------------------------------------------------------------------------------------------------
    def exported_student(self) -> ExportedStudent:
        """The final weights as the student (the LoRA adapter, or the whole UNet), and as LoRA variants
        ``<k>step`` the weights each earlier k-segment stage ended with (``stage_weights``)."""
        out = student.exported(self.student)
        if out.adapter is not None:
            out.variants = {f"{k}step": dict(self.stage_weights[k]) for k in self._variant_segments()}
        return out

    def _variant_segments(self) -> list[int]:
        """The k of every finished stage whose weights are exported as a LoRA of their own (``lora/<k>step``)."""
        return [k for k in sorted(self.stage_weights) if k != self.final_segments]

    def recipe(self, scheduler_config: dict) -> Recipe:
        """The default call: deterministic DDIM on trailing timesteps (``generate``). Per step count (1, 2, 4, 8 and
        every stage's k), Hyper-SD's usage: a k-segment stage's own LoRA (``lora/<k>step``) at its k with DDIM
        trailing; the final weights with DDIM trailing at their own k when that is over 1, and otherwise with TCD
        (eta 1) at one step and at every count without a LoRA of its own."""
        ts = self.student_timesteps
        name, kwargs, derivable = derive_scheduler(scheduler_config, ts, "ddim")
        final, variants = self.final_segments, self._variant_segments()
        ddim = dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, thresholding=False)
        tcd = {"original_inference_steps": self.cfg.num_ddim_timesteps}  # TCD's grid: the solver's τ_n
        recipes = {}
        for k in sorted({1, 2, 4, 8, *self.cfg.segments}):
            if k in variants:
                recipes[k] = StepRecipe(k, 0.0, "DDIMScheduler", ddim, lora=f"lora/{k}step")
            elif k == final and k > 1:
                recipes[k] = StepRecipe(k, 0.0, "DDIMScheduler", ddim)
            else:
                recipes[k] = StepRecipe(k, 0.0, "TCDScheduler", tcd, eta=1.0)
        return Recipe(self.name, len(ts), 0.0, ts, name, kwargs, derivable, "ddim", list(recipes), recipes)

    # --- resume: the EMA target (full mode) and the kept stage weights --------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method state outside the parameter groups that a resumed run needs: the EMA target (full mode), the
        weights each finished stage ended with, and the stage of the latest loss call."""
        out = {f"stage{k}.{n}": w for k, weights in self.stage_weights.items() for n, w in weights.items()}
        if self._last_segments is not None:
            out["last_segments"] = torch.tensor(self._last_segments)
        if self.target is not None:
            out.update({f"target.{n}": p.detach().float().cpu() for n, p in self.target.named_parameters()})
            out["target_step"] = torch.tensor(self._target_step)
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.stage_weights = {}
        for key, value in tensors.items():
            if key.startswith("stage"):
                k, name = key[len("stage") :].split(".", 1)
                self.stage_weights.setdefault(int(k), {})[name] = value.float().cpu().clone()
        self._last_segments = int(tensors["last_segments"]) if "last_segments" in tensors else None
        if self.target is None:
            return
        with torch.no_grad():
            for n, p in self.target.named_parameters():
                p.copy_(tensors[f"target.{n}"].to(p.device, p.dtype))
        self._target_step = int(tensors["target_step"])

    # --- construction from a diffusers teacher --------------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> TSCD:
        if not ctx.with_real_data:
            raise ValueError("tscd trains on real latents (as PCM/LCM do): set dataset=<image folder>")
        reward_fn = None
        if ctx.config.reward_weight:
            from .reward import build_reward

            reward_fn = build_reward(ctx.config.reward_model, ctx.teacher)
        return cls.from_teacher(ctx.teacher, ctx.config, ctx.latent_shape, reward_fn)

    @classmethod
    def from_teacher(cls, teacher, cfg: TSCDConfig, latent_shape, reward_fn: Callable | None = None) -> TSCD:
        """LoRA (default): adapter ``student`` on the teacher UNet, adapters disabled = the teacher, one UNet.

        Full: a trainable copy plus a frozen EMA target copy (three UNets). With ``dmd_weight`` the fake score is
        adapter ``fake`` (LoRA) or a further copy (full); with ``adversarial_weight`` a DMD2-style head reads the
        bare teacher's mid-block features.
        """
        from ...models.heads import DiscriminatorHead
        from ...models.lora import add_adapter, named_adapter_parameters

        if cfg.student not in ("lora", "full"):
            raise ValueError(f"tscd.student must be 'lora' or 'full', got {cfg.student!r}")
        base = teacher.unet

        def make(adapter: str):
            if cfg.student == "full":
                unet = copy.deepcopy(base).float().requires_grad_(True)
                return teacher.denoiser(unet), dict(unet.named_parameters())
            add_adapter(base, adapter, cfg.lora_rank, cfg.lora_alpha)
            return teacher.denoiser(base, adapter=adapter), named_adapter_parameters(base, adapter)

        bare = teacher.denoiser(base, adapter=None)  # adapters disabled = the teacher
        student, student_params = make("student")
        target = None
        if cfg.student == "full":
            target = teacher.denoiser(copy.deepcopy(student.unet).requires_grad_(False))
        fake, fake_params = make("fake") if cfg.dmd_weight else (None, None)
        head = None
        if cfg.adversarial_weight:
            mid_side = latent_shape[-1] // 2 ** (len(base.config.block_out_channels) - 1)
            head = DiscriminatorHead(base.config.block_out_channels[-1], mid_side)
        return cls(
            student,
            CFG(bare, cfg.guidance_scale, teacher.unconditional(latent_shape)),
            cfg,
            latent_shape,
            student_params,
            target=target,
            features=bare if head is not None else None,
            head=head,
            reward_fn=reward_fn,
            fake_score=fake,
            fake_params=fake_params,
            keep_stage_weights=cfg.student == "lora",
        )
