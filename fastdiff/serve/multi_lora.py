"""Many LoRA adapters in one UNet call: every batch row gets its own adapters' low-rank update.

Multi-LoRA servers for LLMs (S-LoRA, Punica, LoRAX) batch requests of different adapters together by applying each
row's own update, ``y = W x + sum_j w_ij s_j B_j A_j x``, instead of running one sub-batch per adapter. This module
does the same for UNet LoRAs: linear layers (attention projections, feed-forwards, time projections) and convs (a
LoRA conv is A: a k x k conv to r channels with the base conv's stride and padding, B: a 1 x 1 conv from r channels).

Each targeted base layer keeps the A and B of every loaded adapter stacked by adapter, ranks zero-padded to the
largest, the scaling s_j (alpha / r) folded into B, and an all-zero adapter at index 0. For one pipeline call,
``rows`` (or ``attach``) takes each image's adapters and weights and hooks every targeted layer. The hook gathers
each row's adapters, concatenated along the rank axis (``A_row: [K r, in]``, ``B_row: [out, K r]`` scaled by the
row's weights; K = most adapters on one image, short rows padded with the zero adapter), then adds

    linear: y = base(x) + bmm(bmm(x, A_row^T), B_row^T)       (two batched matmuls over the rows)
    conv:   y = base(x) + bmm(B_row, conv(x, A_row, groups=rows))  (a grouped conv, one group per row)

The gathered weights are kept for the following UNet calls of the block (the pipeline's steps) within a memory
budget. Every row computes exactly its own adapters' low-rank FLOPs, whatever the number of adapters in the batch,
in two ops per layer; rows without an adapter get an exact zero update; a row with two adapters gets the sum of
their updates. CFG doubles the rows the UNet sees ([unconditional, conditional]): the per-image weights repeat to
any multiple of the image count.

Measured on the tiny SDXL UNet (one CPU thread, one UNet call of 8 rows, 4 adapters, median ms):

    rank 4, 8 x 8 latents:    this 16.5-17.0, peft one adapter for all rows 17.6-18.6, peft mixed 37.6-40.1
    rank 32, 32 x 32 latents: this 146-151,   peft one adapter for all rows 157-162,   peft mixed 187-198

(peft mixed: its per-image ``adapter_names``, one sub-batch per adapter in every layer.) Two alternatives measured
no faster: every present adapter on every row with shared weights and a per-row mask (16.7-17.1 ms, but 260 ms at
rank 32: K times the low-rank FLOPs), and each adapter on its own rows via index_select / index_add (31-34 ms).

Not measured on a GPU: there the gathered weights (rows x K x one adapter's size per layer, kept up to
``MultiLoRA(cache_bytes=...)``) and the grouped conv are the parts to watch.

The hooks go on the base ``nn.Linear`` / ``nn.Conv2d`` modules (a peft LoRA layer's ``base_layer`` where peft
wraps the module): peft adapters loaded on the same UNet keep working, and must be inactive during ``rows``.

Weights come from a LoRA file (diffusers/PEFT or kohya keys, converted by diffusers' own loader, with the rank and
alpha peft would give each module: ``read_lora``) or from a peft adapter already loaded on the UNet (``load_peft``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PerRow = Sequence[Sequence[tuple[str, float]]]  # each image's (adapter, weight) pairs; () for the base model


@dataclass
class LoRAModule:
    """One adapter's update of one base layer: ``scaling * B(A(x))``.

    ``down`` is lora_A's weight (``[r, in]`` or ``[r, in, k, k]``), ``up`` lora_B's (``[out, r]`` or
    ``[out, r, 1, 1]``), ``scaling`` alpha / r (alpha / sqrt(r) for rsLoRA).
    """

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


def read_lora(path: str | Path, unet: nn.Module) -> dict[str, LoRAModule]:
    """The UNet part of a LoRA file as ``{module name: LoRAModule}``, as ``pipe.load_lora_weights`` maps it.

    Keys are converted by diffusers (kohya / SGM names to diffusers module paths, legacy ``lora.down`` to peft's
    ``lora_A``); each module's rank and alpha are those peft would give it: from the file's LoraConfig metadata,
    else its kohya ``.alpha`` values, else alpha = rank.

    Args:
        path: a ``.safetensors`` LoRA file.
        unet: the UNet it goes on (its config maps SDXL block names).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    path = Path(path)
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=True,
        local_files_only=True,
        unet_config=unet.config,
        return_lora_metadata=True,
    )

    def unet_part(d):  # what load_lora_adapter(prefix="unet") keeps
        return {k.removeprefix("unet."): v for k, v in (d or {}).items() if k.startswith("unet.")} or None

    state_dict, alphas, metadata = unet_part(state_dict) or {}, unet_part(alphas), unet_part(metadata)
    if not state_dict:
        return {}
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(state_dict, alphas, metadata, ranks)
    return lora_modules(state_dict, config)


def lora_modules(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, LoRAModule]:
    """``{module name: LoRAModule}`` from peft-keyed UNet weights (``<module>.lora_A.weight`` / ``lora_B``) and
    their peft ``LoraConfig`` (rank and alpha per module through its ``rank_pattern`` / ``alpha_pattern``)."""
    from peft.utils.other import get_pattern_key

    unsupported = [k for k in state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported or config.use_dora:
        raise ValueError(f"only plain LoRA weights are supported (no DoRA, no LoRA bias): {unsupported[:3]}")
    out = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
        )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[name] = LoRAModule(down, state_dict[f"{name}.lora_B.weight"], scaling)
    return out


class _Rows:
    """One ``attach``: each image's adapters and weights (``[images, K]``; K = most adapters on one image, shorter
    lists padded with None, the zero adapter, at weight 1), the bytes its hooks may still keep, and the index
    tensors they share."""

    def __init__(self, adapters: list[list[str | None]], weights: torch.Tensor, budget: int):
        self.adapters, self.weights, self.budget = adapters, weights, budget
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def index(self, slots: tuple, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stack index of each row's adapters (``slots`` per image, repeated to ``rows``, flattened) and their
        weights (``[rows, K, 1, 1]``; None when all are 1), on ``like``'s device and dtype; layers with the same
        ``slots`` share them."""
        images = len(slots)
        if rows % images:
            raise RuntimeError(f"a LoRA layer saw {rows} rows, not a multiple of {images} images")
        key = (slots, rows, like.device, like.dtype)
        if key not in self._index:
            s = torch.tensor(slots, device=like.device).repeat(rows // images, 1).view(-1)
            w = self.weights.to(like.device, like.dtype).repeat(rows // images, 1)
            self._index[key] = (s, None if bool((w == 1).all()) else w[:, :, None, None])
        return self._index[key]


class _Layer:
    """One targeted base layer and its adapters' weights, stacked by adapter (index 0: a zero adapter)."""

    def __init__(self, base: nn.Module):
        if not isinstance(base, nn.Linear | nn.Conv2d):
            raise ValueError(f"LoRA on {type(base).__name__} is not supported (nn.Linear and nn.Conv2d are)")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError("LoRA on a grouped or non-zero-padded Conv2d is not supported")
        self.base = base
        self.conv = isinstance(base, nn.Conv2d)
        self.modules: dict[str, LoRAModule] = {}
        self.slot: dict[str, int] = {}  # adapter -> its index in the stacks
        self.down = self.up = None

    def restack(self) -> None:
        """Stack the adapters, ranks zero-padded to the largest: ``down [1 + adapters, r, in(, k, k)]``, and
        ``up`` with the scaling folded in, ``[1 + adapters, r, out]`` (linear) or ``[1 + adapters, out, r]``
        (conv)."""
        w = self.base.weight
        rank = max((m.down.shape[0] for m in self.modules.values()), default=0)
        n = len(self.modules) + 1
        self.down = w.new_zeros(n, rank, *w.shape[1:])
        self.up = w.new_zeros(n, w.shape[0], rank) if self.conv else w.new_zeros(n, rank, w.shape[0])
        for i, m in enumerate(self.modules.values(), 1):
            r = m.down.shape[0]
            self.down[i, :r] = m.down
            up = m.up.flatten(1) * m.scaling  # [out, r]
            if self.conv:
                self.up[i, :, :r] = up
            else:
                self.up[i, :r] = up.T
        self.slot = {name: i for i, name in enumerate(self.modules, 1)}

    def hook(self, batch: _Rows):
        """A forward hook adding each row's update for ``batch``; None when no adapter of it touches this layer.

        The per-row weights are gathered on the first call with a given row count and kept for the following
        calls (the pipeline's steps) while the batch's byte budget lasts; past it they are gathered on every call.
        """
        slots = tuple(tuple(self.slot.get(name, 0) for name in row) for row in batch.adapters)
        if not any(map(any, slots)):
            return None
        down_stack, up_stack = self.down, self.up  # as of now: a load inside the block does not shift them
        gathered: dict[int, tuple | None] = {}  # rows -> kept (down, up), or None: gather on every call

        def per_row(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Each row's adapters concatenated along the rank axis: ``down [rows, K r, in(, k, k)]`` and ``up``
            scaled by the row's weights, ``[rows, K r, out]`` (linear) or ``[rows, out, K r]`` (conv)."""
            s, w = batch.index(slots, rows, down_stack)
            down = down_stack.index_select(0, s).view(rows, -1, *down_stack.shape[2:])  # [rows, K r, ...]
            up = up_stack.index_select(0, s).view(rows, -1, *up_stack.shape[1:])
            up = up if w is None else up * w  # [rows, K, r, out] (linear) or [rows, K, out, r] (conv)
            up = up.permute(0, 2, 1, 3).flatten(2) if self.conv else up.flatten(1, 2)
            return down, up

        def add_update(_module, args, output):
            x = args[0]
            rows = len(x)
            if rows not in gathered:
                nbytes = (down_stack[0].nbytes + up_stack[0].nbytes) * len(slots[0]) * rows
                gathered[rows] = per_row(rows) if nbytes <= batch.budget else None
                batch.budget -= nbytes if gathered[rows] else 0
            down, up = gathered[rows] or per_row(rows)
            if self.conv:  # A: a grouped conv, one group per row; B (1 x 1): a batched matmul over the pixels
                h = F.conv2d(
                    x.reshape(1, -1, *x.shape[2:]),
                    down.flatten(0, 1),
                    None,
                    self.base.stride,
                    self.base.padding,
                    self.base.dilation,
                    groups=rows,
                )
                h = h.view(rows, -1, h.shape[2] * h.shape[3])
                out = torch.baddbmm(output.reshape(rows, output.shape[1], -1), up, h)
            else:
                h = torch.bmm(x.reshape(rows, -1, x.shape[-1]), down.transpose(1, 2))
                out = torch.baddbmm(output.reshape(rows, -1, output.shape[-1]), h, up)
            return out.view(output.shape)

        return add_update


def _same_weights(layer: nn.Module, peft_name: str, down: weakref.ref) -> bool:
    """Whether ``layer`` still holds, as adapter ``peft_name``, the lora_A weight ``down`` refers to."""
    return peft_name in layer.lora_A and layer.lora_A[peft_name].weight is down()


class MultiLoRA:
    """LoRA adapters loaded side by side on one UNet, applied per batch row.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (possibly carrying peft layers).
        cache_bytes: how much memory one ``rows`` block may keep of the per-row gathered LoRA weights (reused
            over the pipeline's steps); layers past it gather theirs on every UNet call.

    Example::

        multi = MultiLoRA(pipe.unet)
        multi.load("a", read_lora("a.safetensors", pipe.unet))
        multi.load("b", read_lora("b.safetensors", pipe.unet))
        with multi.rows([[("a", 1.0)], [("b", 0.7)], [("a", 0.5), ("b", 0.5)], []]):
            images = pipe(prompt=[...4 prompts...]).images
    """

    def __init__(self, unet: nn.Module, cache_bytes: int = 256 << 20):
        self.unet = unet
        self.cache_bytes = cache_bytes
        self.adapters: dict[str, list[str]] = {}  # adapter -> the module names it targets
        self._layers: dict[str, _Layer] = {}  # module name -> its stacked adapters
        # adapter taken from peft (load_peft) -> (one of its peft layers, its peft name, a weakref to its lora_A)
        self._peft_sources: dict[str, tuple] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def load(self, name: str, modules: Mapping[str, LoRAModule]) -> None:
        """Add adapter ``name`` (replacing one of that name): ``{module name: LoRAModule}`` as ``read_lora``
        returns it. Shapes are checked against the base layers; nothing changes on an error."""
        layers = {}
        for module_name, m in modules.items():
            layer = self._layers.get(module_name) or _Layer(self._base(module_name))
            w = layer.base.weight
            want_down = (m.down.shape[0], *w.shape[1:])
            want_up = (w.shape[0], m.down.shape[0], *([1] * (w.ndim - 2)))
            if tuple(m.down.shape) != want_down or tuple(m.up.shape) != want_up:
                raise ValueError(
                    f"adapter {name!r}, module {module_name}: LoRA shapes {tuple(m.down.shape)} / "
                    f"{tuple(m.up.shape)} do not fit the base weight {tuple(w.shape)}"
                )
            layers[module_name] = layer
        if name in self.adapters:
            self.unload(name)
        for module_name, layer in layers.items():
            layer.modules[name] = modules[module_name]
            layer.restack()
            self._layers[module_name] = layer
        self.adapters[name] = list(layers)

    def load_peft(self, name: str, peft_name: str | None = None) -> None:
        """Add adapter ``name`` from the peft adapter ``peft_name`` (default ``name``) already loaded on the UNet
        (e.g. by ``pipe.load_lora_weights``), with peft's own per-module scaling (before ``set_adapters``
        weights)."""
        from peft.tuners.lora import LoraLayer

        peft_name = peft_name or name
        modules, source = {}, None
        for module_name, layer in self.unet.named_modules():
            if isinstance(layer, LoraLayer) and peft_name in layer.lora_A:
                r, alpha = layer.r[peft_name], layer.lora_alpha[peft_name]
                scaling = alpha / math.sqrt(r) if layer.use_rslora[peft_name] else alpha / r
                down = layer.lora_A[peft_name].weight
                modules[module_name] = LoRAModule(
                    down.detach(), layer.lora_B[peft_name].weight.detach(), scaling
                )
                source = source or (layer, peft_name, weakref.ref(down))
        if not modules:
            raise KeyError(f"no peft adapter {peft_name!r} on this UNet")
        self.load(name, modules)
        self._peft_sources[name] = source

    def sync_peft(self, names: Iterable[str]) -> None:
        """Follow the UNet's peft adapters: drop those taken from peft (``load_peft``) that it no longer has, and
        take ``names`` from it where missing, or where peft has loaded the adapter again since."""
        present = getattr(self.unet, "peft_config", None) or {}
        for name in [n for n in self._peft_sources if n not in present]:
            self.unload(name)
        for name in names:
            source = self._peft_sources.get(name)
            if source is None or not _same_weights(*source):
                self.load_peft(name)

    def unload(self, name: str) -> None:
        """Drop adapter ``name`` (a no-op when it is not loaded)."""
        self._peft_sources.pop(name, None)
        for module_name in self.adapters.pop(name, ()):
            layer = self._layers[module_name]
            del layer.modules[name]
            if layer.modules:
                layer.restack()
            else:
                del self._layers[module_name]

    def attach(self, per_row: PerRow) -> list:
        """Hook each image's adapters onto its rows until the returned handles are removed (``rows`` as a
        context manager). Only layers some adapter of the batch targets get a hook.

        Args:
            per_row: per image, its ``(adapter, weight)`` pairs (several sum; ``()`` for none). The UNet may see
                any multiple of ``len(per_row)`` rows, image-major within each copy (CFG's
                ``[unconditional, conditional]`` halves).

        Returns:
            the ``torch.utils.hooks.RemovableHandle`` of every hook.
        """
        for pairs in per_row:
            for name, _ in pairs:
                if name not in self.adapters:
                    raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names})")
        k = max([1, *map(len, per_row)])
        adapters = [[name for name, _ in pairs] + [None] * (k - len(pairs)) for pairs in per_row]
        weights = torch.tensor([[float(w) for _, w in pairs] + [1.0] * (k - len(pairs)) for pairs in per_row])
        batch = _Rows(adapters, weights, self.cache_bytes)
        handles = []
        for layer in self._layers.values():
            hook = layer.hook(batch)
            if hook is not None:
                handles.append(layer.base.register_forward_hook(hook))
        return handles

    @contextmanager
    def rows(self, per_row: PerRow) -> Iterator[None]:
        """Apply each image's adapters to its rows for the UNet calls made inside the block (see ``attach``)."""
        handles = self.attach(per_row)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _base(self, module_name: str) -> nn.Module:
        try:
            module = self.unet.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"the UNet has no module {module_name!r}") from None
        return getattr(module, "base_layer", module)
