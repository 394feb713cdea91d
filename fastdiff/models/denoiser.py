"""Denoisers: every network a method talks to is read as an x0 predictor D(x_t, t, cond).

A method never sees whether D is a UNet (native eps/v output, SDXL conditioning, a LoRA adapter on a shared base)
or the closed-form Gaussian-mixture teacher: it calls ``D(x_t, t, cond)`` and gets x0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from .. import schedule


@dataclass
class Cond:
    """Conditioning of a UNet batch: prompt embeddings, plus SDXL's pooled embeddings and time ids, or an image
    UNet's input image (the x4 upscaler's noised low-resolution image, concatenated to the latents along channels)
    and its class labels (the upscaler's noise level)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> Cond:
        return Cond(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )

    def __getitem__(self, idx) -> Cond:
        return self._map(lambda v: v[idx])

    def to(self, *args, **kwargs) -> Cond:
        """Move (and cast) the floating-point fields; integer ones (class labels) keep their dtype."""
        dtype = kwargs.pop("dtype", None)

        def move(v):
            v = v.to(*args, **kwargs)
            return v.to(dtype) if dtype is not None and v.is_floating_point() else v

        return self._map(move)

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        if self.class_labels is not None:
            kw["class_labels"] = self.class_labels
        return kw

    def unet_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """The UNet's sample input: the latents, with the conditioning image concatenated where there is one."""
        return x_t if self.image is None else torch.cat([x_t, self.image.to(x_t.dtype)], dim=1)


def cat_conds(conds: list) -> Cond | torch.Tensor:
    """Concatenate conditions along the batch (``Cond`` objects or plain label tensors)."""
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(conds)
    return Cond(
        **{
            f.name: None
            if getattr(conds[0], f.name) is None
            else torch.cat([getattr(c, f.name) for c in conds])
            for f in fields(Cond)
        }
    )


class Denoiser(nn.Module):
    """Base class: ``forward(x_t, t, cond)`` returns the x0 prediction; ``native`` the raw network output."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.prediction_type = prediction_type

    def native(self, x_t, t, cond, features: bool = False):
        raise NotImplementedError

    def forward(self, x_t, t, cond, features: bool = False):
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out = self.native(x_t, t, cond, features=features)
        pred, feats = out if features else (out, None)
        x0 = schedule.to_x0(pred.float(), x_t.float(), t, self.alphas_cumprod, self.prediction_type)
        return (x0, feats) if features else x0

    def mid_features(self, x_t, t, cond):
        """Only the features a GAN head reads (``features=True`` without the prediction)."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.native(x_t, t, cond, features=True)[1]


class _MidBlockReached(Exception):
    """Raised by a forward hook to stop a UNet after its mid-block (the decoder's work would be thrown away)."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def _stop_after_mid(module, inputs, output):
    raise _MidBlockReached(output)


class UNetDenoiser(Denoiser):
    """A diffusers UNet2DConditionModel read as an x0 predictor.

    Args:
        unet: the UNet (possibly carrying peft LoRA adapters, possibly shared with other denoisers).
        adapter: which LoRA adapter is active for this denoiser: a name, ``None`` for the bare base weights (the
            teacher in shared-base mode), or ``"*"`` to leave the UNet as it is (no adapters at all).
    """

    def __init__(self, unet, alphas_cumprod, prediction_type="epsilon", adapter: str | None = "*"):
        super().__init__(alphas_cumprod, prediction_type)
        self.unet = unet
        self.adapter = adapter
        self._mid = None

    def native(self, x_t, t, cond: Cond, features: bool = False):
        from .lora import use_adapter

        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        hook = None
        if features:
            hook = self.unet.mid_block.register_forward_hook(lambda m, i, o: setattr(self, "_mid", o))
        try:
            with use_adapter(self.unet, self.adapter):
                dtype = self.unet.dtype
                c = cond.to(dtype=dtype)
                pred = self.unet(c.unet_input(x_t.to(dtype)), t, **c.unet_kwargs(), return_dict=False)[0]
        finally:
            if hook is not None:
                hook.remove()
        if features:
            feats, self._mid = self._mid, None
            return pred, feats
        return pred

    def mid_features(self, x_t, t, cond: Cond):
        """The mid-block output alone: the UNet stops there (as DMD2's classify mode does), about half the cost."""
        from .lora import use_adapter

        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        hook = self.unet.mid_block.register_forward_hook(_stop_after_mid)
        try:
            with use_adapter(self.unet, self.adapter):
                c = cond.to(dtype=self.unet.dtype)
                self.unet(c.unet_input(x_t.to(self.unet.dtype)), t, **c.unet_kwargs(), return_dict=False)
        except _MidBlockReached as stop:
            return stop.output
        finally:
            hook.remove()
        raise RuntimeError("the UNet returned without running its mid-block")


class CFG(nn.Module):
    """Classifier-free guidance on a denoiser: x0 = x0(uncond) + w (x0(cond) - x0(uncond)).

    (CFG in x0 space equals CFG in eps space: for fixed x_t, t the map eps -> x0 is affine.)

    Args:
        base: the conditional denoiser.
        scale: guidance scale w; w == 1 is a plain conditional call.
        null_cond: returns the unconditional condition for a batch of size n.
    """

    def __init__(self, base: nn.Module, scale: float, null_cond: Callable[[int], object]):
        super().__init__()
        self.base, self.scale, self.null_cond = base, float(scale), null_cond

    def forward(self, x_t, t, cond):
        if self.scale == 1.0:
            return self.base(x_t, t, cond)
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).expand(n)
        both = self.base(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds([self.null_cond(n), cond]))
        uncond, cond_x0 = both.chunk(2)
        return uncond + self.scale * (cond_x0 - uncond)


def encoder_features(denoiser: UNetDenoiser, x_t, t, cond: Cond) -> list[torch.Tensor]:
    """The UNet encoder's features at every scale: each down block's output, then the mid block's (the UNet stops
    there). Gradients flow to ``x_t`` (and to the UNet's trainable weights, if any)."""
    from .lora import use_adapter

    unet = denoiser.unet
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
    feats: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o[0])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(_stop_after_mid))
    try:
        with use_adapter(unet, denoiser.adapter):
            c = cond.to(dtype=unet.dtype)
            unet(c.unet_input(x_t.to(unet.dtype)), t, **c.unet_kwargs(), return_dict=False)
    except _MidBlockReached as stop:
        return [*feats, stop.output]
    finally:
        for h in hooks:
            h.remove()
    raise RuntimeError("the UNet returned without running its mid-block")
