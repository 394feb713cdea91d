"""The fake-score critic shared by DMD2, SiD, TSCD's DMD term (and the methods built on them).

f_ψ is a trainable score of the generator's distribution (a UNet copy, or a LoRA adapter), read as an x0 predictor;
D an optional diffusion-GAN head on f_ψ's mid-block features (DMD2's). On detached generator samples x:

    denoising:       t ~ U[0, T),  x_t = α_t x + σ_t ε,   L = mean ||f_ψ^native(x_t, t) - target(x, ε, t)||²
    discriminator:   softplus(D(fake_t)) + softplus(-D(real_t)),   x_t noised at t ~ U[0, T)
    generator (GAN): softplus(-D(x_t))
    DMD term:        t ~ U[t_min, t_max],  g = (x̂_ψ(x_t) - x̂_real(x_t)) / mean|x - x̂_real(x_t)|,
                     L_DM = 0.5 ||x - sg(x - g)||²   (its gradient w.r.t. x is g / numel)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import schedule
from . import losses, student
from .base import ExportedStudent, Method, randint, randn


class Critic(nn.Module):
    """A fake score ``fake_score`` with its trainable parameters and an optional GAN ``head``.

    Args:
        fake_score: f_ψ, a Denoiser (x0 predictor with ``native``, ``mid_features``, ``alphas_cumprod``).
        fake_params: f_ψ's trainable parameters by stable name.
        head: the discriminator head on f_ψ's mid-block features, or None (no GAN terms).
        num_train_timesteps: T.
    """

    def __init__(
        self,
        fake_score: nn.Module,
        fake_params: dict,
        head: nn.Module | None = None,
        num_train_timesteps=1000,
    ):
        super().__init__()
        self.fake_score, self.head = fake_score, head
        self.num_train_timesteps = num_train_timesteps
        self._fake_params = fake_params

    def params(self) -> dict[str, nn.Parameter]:
        """The critic group's parameters: f_ψ's, plus the head's (prefixed ``head.``) when there is one."""
        params = dict(self._fake_params)
        if self.head is not None:
            params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return params

    def gan_on(self, batch: dict) -> bool:
        """GAN terms need a head and real images in the batch."""
        return self.head is not None and batch.get("real") is not None

    def logits(self, x: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """The diffusion-GAN discriminator: D on f_ψ's features of x noised at t ~ U[0, T)."""
        t = randint(0, self.num_train_timesteps, x.shape[0], generator, x.device)
        x_t = schedule.add_noise(x, randn(x.shape, generator, x.device), t, self.fake_score.alphas_cumprod)
        return self.head(self.fake_score.mid_features(x_t, t, cond))

    def denoising_loss(self, x: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """f_ψ's denoising score matching on detached samples x, t ~ U[0, T), in its native parametrisation."""
        acp = self.fake_score.alphas_cumprod
        t = randint(0, self.num_train_timesteps, x.shape[0], generator, x.device)
        eps = randn(x.shape, generator, x.device)
        pred = self.fake_score.native(schedule.add_noise(x, eps, t, acp), t, cond)
        return losses.denoising_loss(
            pred, schedule.target_for(self.fake_score.prediction_type, x, eps, t, acp)
        )

    def discriminator_loss(self, fake, real, cond, real_cond, generator: torch.Generator) -> torch.Tensor:
        """softplus(D(fake_t)) + softplus(-D(real_t)) (unweighted)."""
        return losses.gan_discriminator_loss(
            self.logits(fake, cond, generator), self.logits(real, real_cond, generator)
        )

    def generator_loss(self, x: torch.Tensor, cond, generator: torch.Generator) -> torch.Tensor:
        """The non-saturating generator term softplus(-D(x_t)) (unweighted; gradient flows to x)."""
        return losses.gan_generator_loss(self.logits(x, cond, generator))

    def dmd_loss(self, x, real_score, cond, generator: torch.Generator, min_step: int, max_step: int):
        """DMD's distribution-matching loss on generator samples x (attached), t ~ U[min_step, max_step]."""
        t = randint(min_step, max_step + 1, x.shape[0], generator, x.device)
        x_t = schedule.add_noise(
            x.detach(), randn(x.shape, generator, x.device), t, self.fake_score.alphas_cumprod
        )
        with torch.no_grad():
            x0_fake = self.fake_score(x_t, t, cond)
            x0_real = real_score(x_t, t, cond)
        return losses.dmd_loss(x, x0_real, x0_fake)


class CriticMethod(Method):
    """A method whose student ``generator`` (an x0 predictor at fixed timesteps) is trained against a fake-score
    ``critic`` (DMD2, SiD and the methods built on them): the parts they share."""

    def __init__(
        self,
        generator: nn.Module,
        fake_score: nn.Module,
        cfg,
        sample_shape: tuple[int, ...],
        generator_params: dict[str, nn.Parameter],
        fake_params: dict[str, nn.Parameter],
        head: nn.Module | None = None,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.generator, self.cfg, self.sample_shape = generator, cfg, tuple(sample_shape)
        self.critic = Critic(fake_score, fake_params, head, num_train_timesteps)
        self.num_train_timesteps = num_train_timesteps
        self._generator_params = generator_params

    @property
    def fake_score(self) -> nn.Module:
        return self.critic.fake_score

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.critic.fake_score.alphas_cumprod

    def exported_student(self) -> ExportedStudent:
        return student.exported(self.generator)


def student_and_fake(
    teacher,
    generator: str,
    fake_score: str,
    shared_base: bool,
    rank: int,
    alpha: float,
    section: str,
    adapters: tuple[str, str] = ("student", "fake"),
):
    """Generator and fake score initialised from the teacher's UNet, as DMD2 and SiD build them.

    Each is a full float32 copy (``"full"``) or a LoRA adapter (``"lora"``: adapters named ``adapters``, so that
    several students on one UNet do not collide). With ``shared_base`` the LoRA networks sit on the teacher's own
    frozen UNet (adapters disabled is the teacher) and only full networks get a copy; without it every network
    gets its own copy. The layouts, by UNets in memory (teacher included):

    - ``lora`` + ``lora``, shared: one UNet, two adapters (the memory-saving shared-base mode);
    - ``lora`` generator + ``full`` fake score, shared: two (the reference DMD2 SDXL LoRA recipe's networks; the
      reference also keeps a third, the generator's own frozen base, which is the teacher's weights again);
    - anything without ``shared_base``: three.

    Args:
        teacher: a loaded ``Teacher`` (its ``unet`` and ``denoiser``).
        generator / fake_score: ``"lora"`` or ``"full"``.
        shared_base: LoRA networks as adapters on the teacher's UNet (needs at least one ``"lora"``).
        rank / alpha: LoRA rank and lora_alpha.
        section: the config section the values come from (``"dmd2"``, ``"sid"``), named in errors.
        adapters: the (generator, fake score) adapter names.

    Returns:
        ``(generator, generator_params, fake, fake_params)``: two ``UNetDenoiser`` and their trainable parameters.
    """
    kinds = {"generator": generator, "fake_score": fake_score}
    for key, kind in kinds.items():
        if kind not in ("lora", "full"):
            raise ValueError(f"{section}.{key} must be 'lora' or 'full', got {kind!r}")
    if shared_base and "lora" not in kinds.values():
        raise ValueError(
            f"{section}.shared_base needs a LoRA network to share the teacher's UNet: set {section}.generator=lora "
            f"and/or {section}.fake_score=lora, or {section}.shared_base=false"
        )
    # every copy is taken before an adapter lands on the shared base
    unets = {key: network_base(teacher, kind, shared_base) for key, kind in kinds.items()}

    gen, gen_params = score_network(teacher, unets["generator"], generator, adapters[0], rank, alpha)
    fake, fake_params = score_network(teacher, unets["fake_score"], fake_score, adapters[1], rank, alpha)
    return gen, gen_params, fake, fake_params


def network_base(teacher, kind: str, shared_base: bool) -> nn.Module:
    """The UNet a network is made on: the teacher's own (a LoRA network in shared-base mode) or a float32 copy."""
    return teacher.unet if shared_base and kind == "lora" else copy.deepcopy(teacher.unet).float()


def score_network(teacher, unet: nn.Module, kind: str, adapter: str, rank: int, alpha: float):
    """``unet`` as a trainable denoiser: whole (``"full"``: a copy of the teacher's UNet) or through a new LoRA
    adapter named ``adapter`` on it (``"lora"``). Returns the ``UNetDenoiser`` and its trainable parameters."""
    from ..models.lora import add_adapter, named_adapter_parameters

    if kind not in ("lora", "full"):
        raise ValueError(f"a score network is 'lora' or 'full', not {kind!r}")
    if kind == "full":
        unet.requires_grad_(True)
        return teacher.denoiser(unet), dict(unet.named_parameters())
    add_adapter(unet, adapter, rank, alpha)
    return teacher.denoiser(unet, adapter=adapter), named_adapter_parameters(unet, adapter)


def gan_wanted(section: str, setting: str, with_real_data: bool) -> bool:
    """Resolve a ``gan: auto | on | off`` setting: auto means on exactly when real images are given."""
    with_gan = {"on": True, "off": False, "auto": with_real_data}.get(setting)
    if with_gan is None:
        raise ValueError(f"{section}.gan must be auto, on or off, got {setting!r}")
    if with_gan and not with_real_data:
        raise ValueError(f"{section}.gan=on needs real images: set `dataset=<image folder>`")
    return with_gan
