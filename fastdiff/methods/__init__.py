"""Distillation methods. ``build_method`` turns a config and a loaded teacher into a Method."""

from __future__ import annotations

from .base import Group, Method

METHODS = ("dmd2", "tscd", "sid", "agd")


def _gan_wanted(section: str, setting: str, with_real_data: bool) -> bool:
    """Resolve a ``gan: auto | on | off`` setting: auto means on exactly when real images are given."""
    with_gan = {"on": True, "off": False, "auto": with_real_data}.get(setting)
    if with_gan is None:
        raise ValueError(f"{section}.gan must be auto, on or off, got {setting!r}")
    if with_gan and not with_real_data:
        raise ValueError(f"{section}.gan=on needs real images: set `dataset=<image folder>`")
    return with_gan


def build_method(cfg, teacher, latent_shape, with_real_data: bool) -> Method:
    """The method named by ``cfg.method``, built on ``teacher``."""
    if cfg.method == "dmd2":
        from .dmd2 import DMD2

        with_gan = _gan_wanted("dmd2", cfg.dmd2.gan, with_real_data)
        return DMD2.from_teacher(teacher, cfg.dmd2, latent_shape, with_gan)
    if cfg.method == "sid":
        from .sid import SiD

        with_gan = _gan_wanted("sid", cfg.sid.gan, with_real_data)
        return SiD.from_teacher(teacher, cfg.sid, latent_shape, with_gan, seed=cfg.seed)
    if cfg.method == "agd":
        from .agd import AGD

        return AGD.from_teacher(teacher, cfg.agd, latent_shape)
    if cfg.method == "tscd":
        from .tscd.method import TSCD

        if not with_real_data:
            raise ValueError("tscd trains on real latents (as PCM/LCM do): set dataset=<image folder>")
        reward_fn = None
        if cfg.tscd.reward_weight:
            from .tscd.reward import build_reward

            reward_fn = build_reward(cfg.tscd.reward_model, teacher)
        return TSCD.from_teacher(teacher, cfg.tscd, latent_shape, reward_fn)
    raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")


__all__ = ["METHODS", "Group", "Method", "build_method"]
