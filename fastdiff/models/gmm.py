"""The analytic teacher: an isotropic Gaussian mixture whose denoiser is known in closed form (DESIGN §3).

Data p(x0) = sum_k pi_k N(mu_k, s_k^2 I) in D dims; component k belongs to class c_k. Under the forward process
x_t = a x0 + s eps (a = alpha_t, s = sigma_t):

    p(x_t)      = sum_k pi_k N(x_t; a mu_k, v_k I),   v_k = a^2 s_k^2 + s^2
    r_k(x_t)    = pi_k N(x_t; a mu_k, v_k I) / p(x_t)                          (responsibilities)
    E[x0 | x_t] = sum_k r_k [ mu_k + (a s_k^2 / v_k) (x_t - a mu_k) ]          (Tweedie, per component)

A class label c restricts the mixture to the components with c_k = c (weights renormalised); label -1 means
unconditional (all components), so classifier-free guidance is meaningful.

Also here: ``MLPDenoiser``, a small trainable network for tests (fake scores, generators on the GMM), and the
SD/SDXL ``scaled_linear`` schedule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import schedule
from .denoiser import Denoiser


def scaled_linear_alphas_cumprod(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """alphas_cumprod of the SD/SDXL ``scaled_linear`` schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2.

    Computed in float32 exactly as diffusers' schedulers do.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _per_row(v, n: int, device, dtype) -> torch.Tensor:
    """A scalar or a broadcastable per-sample tensor ([n], [n,1], [n,1,1,1], ...) as a [n] tensor."""
    v = torch.as_tensor(v, device=device, dtype=dtype).reshape(-1)
    return v.expand(n) if v.numel() == 1 else v


class GMM:
    """An isotropic Gaussian mixture p(x0) = sum_k pi_k N(mu_k, s_k^2 I) with a class label per component.

    Args:
        weights: [K] mixture weights pi_k (normalised here).
        means: [K, D] component means mu_k.
        stds: [K] (or scalar) component standard deviations s_k > 0.
        classes: [K] long, the class c_k of each component; default: component index (one class per mode).
    """

    def __init__(self, weights, means, stds, classes=None):
        means = torch.as_tensor(means, dtype=torch.float32)
        self.means = means.reshape(means.shape[0], -1)
        K = self.means.shape[0]
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.means.device).reshape(K)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.weights = w / w.sum()
        self.stds = (
            torch.as_tensor(stds, dtype=torch.float32, device=self.means.device).reshape(-1).expand(K).clone()
        )
        if (self.stds <= 0).any():
            raise ValueError("component stds must be positive")
        if classes is None:
            classes = torch.arange(K)
        self.classes = torch.as_tensor(classes, dtype=torch.long, device=self.means.device).reshape(K)

    # ---- construction / bookkeeping -------------------------------------------------------------------------

    @classmethod
    def random(
        cls,
        num_classes: int = 4,
        modes_per_class: int = 2,
        dim: int = 2,
        spread: float = 4.0,
        std: float = 0.3,
        seed: int = 0,
    ) -> GMM:
        """K = num_classes * modes_per_class well-separated modes, classes interleaved (c_k = k mod num_classes).

        Means lie on a circle of radius R = max(spread, 8 std / (2 sin(pi/K))) in the first two coordinates, so
        neighbouring modes are at least 8 std apart (overlap ~1e-5); in 1-D they are evenly spaced on
        [-R, R] with the same minimum gap. Extra dimensions (dim > 2) get seeded random offsets of total
        scale spread/2 (they only increase distances). Weights are mildly non-uniform (seeded), so
        per-mode weight errors are visible.
        """
        g = torch.Generator().manual_seed(seed)
        K = num_classes * modes_per_class
        if dim == 1:
            R = max(spread, 8 * std * (K - 1) / 2)
            means = torch.linspace(-R, R, K).reshape(K, 1)
        else:
            R = max(spread, 8 * std / (2 * math.sin(math.pi / K))) if K > 1 else spread
            ang = 2 * math.pi * torch.arange(K, dtype=torch.float32) / K
            means = torch.zeros(K, dim)
            means[:, 0], means[:, 1] = R * ang.cos(), R * ang.sin()
            if dim > 2:
                means[:, 2:] = torch.randn(K, dim - 2, generator=g) * (0.5 * spread / math.sqrt(dim - 2))
        weights = torch.softmax(0.5 * torch.randn(K, generator=g), dim=0)
        classes = torch.arange(K) % num_classes
        return cls(weights, means, torch.full((K,), float(std)), classes)

    def to(self, device) -> GMM:
        return GMM(
            self.weights.to(device), self.means.to(device), self.stds.to(device), self.classes.to(device)
        )

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    def _labels(self, labels, n: int) -> torch.Tensor | None:
        if labels is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.means.device).reshape(-1)
        return labels.expand(n) if labels.numel() == 1 else labels

    def log_weights(self, labels=None, n: int = 1) -> torch.Tensor:
        """[n, K] log pi_{k|c}: class-conditional log weights (-inf outside the class; label -1 = all)."""
        logw = self.weights.log().expand(n, -1)
        labels = self._labels(labels, n)
        if labels is None:
            return logw
        mask = (self.classes[None, :] == labels[:, None]) | (labels[:, None] < 0)
        if not mask.any(1).all():
            bad = labels[~mask.any(1)].unique().tolist()
            raise ValueError(
                f"labels {bad} match no mixture component (classes: {self.classes.unique().tolist()})"
            )
        return torch.log_softmax(logw.masked_fill(~mask, -math.inf), dim=1)

    def mean(self, labels=None, n: int = 1) -> torch.Tensor:
        """[n, D] mixture mean E[x0 | c] = sum_k pi_{k|c} mu_k."""
        return self.log_weights(labels, n).exp() @ self.means

    # ---- sampling and densities -----------------------------------------------------------------------------

    def sample(self, n: int, labels=None, generator: torch.Generator | None = None):
        """Draw x0 ~ p(x0) (or p(x0 | c) per row when ``labels`` is given; -1 = unconditional).

        Returns (x0 [n, D], labels [n], components [n]). Without ``labels`` the returned labels are the drawn
        components' classes c_k; with ``labels`` they are the labels as given.
        """
        dev = self.means.device
        labels = self._labels(labels, n)
        if labels is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
            labels = self.classes[comp]
        else:
            n = labels.shape[0]
            comp = torch.multinomial(self.log_weights(labels, n).exp(), 1, generator=generator).squeeze(1)
        eps = torch.randn(n, self.dim, generator=generator, device=dev)
        x0 = self.means[comp] + self.stds[comp, None] * eps
        return x0, labels, comp

    def _log_joint(self, x: torch.Tensor, alpha, sigma, labels=None) -> torch.Tensor:
        """[n, K] log pi_{k|c} + log N(x_t; a mu_k, v_k I), v_k = a^2 s_k^2 + s^2, for x = x_t flattened [n, D]."""
        n, D = x.shape
        a = _per_row(alpha, n, x.device, x.dtype)[:, None]  # [n, 1]
        s = _per_row(sigma, n, x.device, x.dtype)[:, None]
        mu, sk2 = self.means.to(x.dtype), (self.stds**2).to(x.dtype)
        v = a**2 * sk2[None, :] + s**2  # [n, K]
        # squared distances |x_t - a mu_k|^2, one component at a time (exact, no [n, K, D] tensor)
        d2 = torch.stack([((x - a * mu[k]) ** 2).sum(1) for k in range(mu.shape[0])], dim=1)
        log_n = -0.5 * d2 / v - 0.5 * D * torch.log(2 * math.pi * v)
        return self.log_weights(labels, n).to(x.dtype) + log_n

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    def log_prob(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """[n] exact log p(x) = logsumexp_k [log pi_{k|c} + log N(x; mu_k, s_k^2 I)] (log p(x | c) with labels)."""
        return torch.logsumexp(self._log_joint(self._flat(x), 1.0, 0.0, labels), dim=1)

    def responsibilities(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """[n, K] posterior p(k | x0 = x) at noise level 0: which component generated x."""
        return torch.softmax(self._log_joint(self._flat(x), 1.0, 0.0, labels), dim=1)

    def denoise(self, x_t: torch.Tensor, alpha, sigma, labels=None) -> torch.Tensor:
        """Exact posterior mean E[x0 | x_t] (per-row class conditioning; -1 = unconditional).

        r_k = softmax_k(log pi_{k|c} + log N(x_t; a mu_k, v_k I)) with v_k = a^2 s_k^2 + s^2, and
        E[x0|x_t] = sum_k r_k [mu_k + g_k (x_t - a mu_k)], g_k = a s_k^2 / v_k
                  = sum_k r_k (1 - a g_k) mu_k + (sum_k r_k g_k) x_t.
        ``x_t`` may have any shape [n, ...] with prod(...) = D; ``alpha``/``sigma`` are scalars or per-row
        tensors ([n], [n,1], [n,1,1,1]). Differentiable in x_t.
        """
        shape, dtype = x_t.shape, x_t.dtype
        x = self._flat(x_t)
        n = x.shape[0]
        a = _per_row(alpha, n, x.device, x.dtype)[:, None]
        s = _per_row(sigma, n, x.device, x.dtype)[:, None]
        r = torch.softmax(self._log_joint(x, a, s, labels), dim=1)  # [n, K]
        sk2 = (self.stds**2).to(x.dtype)[None, :]
        g = a * sk2 / (a**2 * sk2 + s**2)  # [n, K] per-component Wiener gain
        x0 = (r * (1 - a * g)) @ self.means.to(x.dtype) + (r * g).sum(1, keepdim=True) * x
        return x0.reshape(shape).to(dtype)


class GMMDenoiser(Denoiser):
    """The GMM teacher as a ``Denoiser``: D(x_t, t, c) = E[x0 | x_t, c] exactly (prediction_type "sample").

    alpha_t, sigma_t come from ``alphas_cumprod`` at the integer timesteps t; ``cond`` is a long label tensor
    (-1 = unconditional) or None (unconditional).
    """

    def __init__(self, gmm: GMM, alphas_cumprod: torch.Tensor):
        super().__init__(alphas_cumprod, prediction_type="sample")
        self.gmm = gmm

    def native(self, x_t, t, cond=None, features: bool = False):
        if self.gmm.means.device != x_t.device:
            self.gmm = self.gmm.to(x_t.device)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        a, s = schedule.alpha_sigma(self.alphas_cumprod, t, x_t.float())
        x0 = self.gmm.denoise(x_t, a, s, labels=cond)
        return (x0, None) if features else x0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half) (as in DDPM/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class MLPDenoiser(Denoiser):
    """A small trainable denoiser for D-dim data (tests, GMM experiments).

    e = MLP(sinusoid(t)) + Emb(c)  (Emb has an extra "null" row used for label -1 / None);
    h_1 = SiLU(W_1 x_t + e), h_i = SiLU(W_i h_{i-1} + e) for i = 2..depth;  out = W_out h_depth.
    ``native`` returns the raw output in ``prediction_type`` ("epsilon", "v_prediction" or "sample");
    ``features=True`` also returns h_depth [n, hidden] (for a GAN head).

    Args:
        alphas_cumprod: the schedule.
        dim: data dimension D (inputs of shape [n, ...] are flattened).
        num_classes: number of class labels (0 = unconditional only).
        hidden: width; depth: number of hidden layers.
        init_from: an ``MLPDenoiser`` (or its state dict) to copy the weights from.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        dim: int = 2,
        num_classes: int = 0,
        hidden: int = 128,
        depth: int = 3,
        prediction_type: str = "epsilon",
        temb_dim: int = 64,
        init_from: MLPDenoiser | dict | None = None,
    ):
        super().__init__(alphas_cumprod, prediction_type)
        if prediction_type not in schedule.PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.dim, self.num_classes, self.temb_dim = dim, num_classes, temb_dim
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = nn.Embedding(num_classes + 1, hidden)  # row num_classes = null (-1)
        self.layers = nn.ModuleList([nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)])
        self.out = nn.Linear(hidden, dim)
        if init_from is not None:
            sd = init_from.state_dict() if isinstance(init_from, nn.Module) else init_from
            self.load_state_dict(sd)

    def native(self, x_t, t, cond=None, features: bool = False):
        n = x_t.shape[0]
        x = x_t.reshape(n, -1).float()
        t = torch.as_tensor(t, device=x.device).expand(n)
        if cond is None:
            cond = torch.full((n,), -1, dtype=torch.long, device=x.device)
        c = torch.as_tensor(cond, device=x.device).long().expand(n)
        c = torch.where(c < 0, torch.full_like(c, self.num_classes), c)
        e = self.time_mlp(timestep_embedding(t, self.temb_dim)) + self.label_emb(c)
        h = x
        for layer in self.layers:
            h = nn.functional.silu(layer(h) + e)
        pred = self.out(h).reshape(x_t.shape)
        return (pred, h) if features else pred
