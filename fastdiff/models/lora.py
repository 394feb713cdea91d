"""peft LoRA helpers: named adapters on one UNet (shared-base mode), state-dict export, LoRA file checks.

Shared-base mode (DESIGN.md §1) keeps one frozen UNet in memory and reads it three ways: adapters disabled is the
teacher, adapter ``fake`` the fake score, adapter ``student`` the generator. ``use_adapter`` switches between them
for the length of a block. peft's switches (``set_adapter``, ``enable_adapters``) also set ``requires_grad`` on the
LoRA weights as a side effect; the trainer owns ``requires_grad``, so ``use_adapter`` puts every flag back.

Exports: ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys plus the LoraConfig as metadata, so diffusers
rebuilds the exact rank and alpha) and ``kohya_lora.safetensors`` (``lora_unet_*`` keys with per-module ``.alpha``).
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

# DMD2's generator LoRA targets (tianweiy/DMD2, main/sd_unified_model.py). peft matches each name as a suffix of
# a module path, so these hit the attention projections, the GEGLU/linear feed-forward, the transformer's
# proj_in/proj_out, the resnets' convs and time projection, and the down/up-sampler convs.
UNET_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "kohya_lora.safetensors"
ANY = "*"  # use_adapter: leave the UNet as it is

_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)(\.\w+)?\.(weight|bias)$"
)
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te\d?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_EXPECTED = (
    "expected diffusers/PEFT keys ('unet.<module>.lora_A.weight' / '.lora_B.weight', or '.lora.down' / "
    "'.lora.up') or kohya keys ('lora_unet_<module>.lora_down.weight' / '.lora_up.weight' / '.alpha', 'lora_te*')"
)


class LoRAFormatError(ValueError):
    """A LoRA file that fastdiff will not load: wrong suffix, unknown keys, or modules the UNet does not have."""


def lora_config(
    rank: int = 64,
    alpha: float = 8,
    targets: Sequence[str] = UNET_LORA_TARGETS,
    init: bool | str = "gaussian",
):
    """A peft ``LoraConfig`` whose adapter starts as a no-op (lora_B is zero).

    Args:
        rank: LoRA rank r.
        alpha: lora_alpha; the adapter's output is scaled by alpha / rank.
        targets: module-name suffixes to adapt.
        init: peft ``init_lora_weights``: ``"gaussian"`` (A ~ N(0, 1/r)) or ``True`` (A Kaiming-uniform). Other
            schemes (PiSSA, OLoRA, ...) rewrite the base weights, which would corrupt a shared teacher: refused.
    """
    from peft import LoraConfig

    if init not in (True, "gaussian"):
        raise ValueError(f"init must be True or 'gaussian' (lora_B = 0, base untouched), got {init!r}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init)


# unet -> (adapter names, [(module name, tuner layer)], [LoRA parameters]); rebuilt when the adapter set changes.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lora_layers(unet: nn.Module) -> tuple[list, list[nn.Parameter]]:
    """The peft tuner layers of ``unet`` (with their module names) and all their adapter parameters, cached."""
    names = tuple((k, id(v)) for k, v in (getattr(unet, "peft_config", None) or {}).items())
    hit = _CACHE.get(unet)
    if hit is None or hit[0] != names:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
        params = [p for _, m in layers for n, p in m.named_parameters() if not n.startswith("base_layer.")]
        hit = _CACHE[unet] = (names, layers, params)
    return hit[1], hit[2]


def adapter_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of one named adapter (e.g. for an optimizer group).

    Args:
        unet: a model carrying peft adapters.
        name: the adapter name.
    """
    out = []
    for _, layer in _lora_layers(unet)[0]:
        for attr in layer.adapter_layer_names:
            store = getattr(layer, attr)
            if name in store:
                item = store[name]
                out.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
    return out


def _snapshot(unet: nn.Module) -> tuple[list[str], bool, list[tuple[nn.Parameter, bool]]]:
    layers, params = _lora_layers(unet)
    first = layers[0][1]
    return list(first.active_adapters), not first.disable_adapters, [(p, p.requires_grad) for p in params]


def _activate(unet: nn.Module, active: list[str] | None, enabled: bool) -> None:
    """Set the active adapters and the enabled flag with peft's own layer methods, skipping no-op calls.

    This is what ``unet.set_adapter`` / ``enable_adapters`` / ``disable_adapters`` do, over the cached tuner layers
    instead of a walk over every module (about 12k in SDXL: half the cost of a switch).
    """
    for _, layer in _lora_layers(unet)[0]:
        if active is not None and list(layer.active_adapters) != active:
            layer.set_adapter(active)
        if layer.disable_adapters == enabled:
            layer.enable_adapters(enabled)


def _restore(unet: nn.Module, state) -> None:
    active, enabled, flags = state
    _activate(unet, active, enabled)
    for p, flag in flags:
        p.requires_grad_(flag)


def add_adapter(
    unet: nn.Module, name: str, rank: int = 64, alpha: float = 8, targets: Sequence[str] | None = None
) -> list[nn.Parameter]:
    """Add a named LoRA adapter (a no-op at init) and return its parameters, all trainable.

    Existing adapters keep their ``requires_grad`` flags and the active/enabled state stays as it was (the first
    adapter added becomes the active one). As in peft, the first adapter freezes the base weights.

    Args:
        unet: a diffusers model with peft support (``UNet2DConditionModel``).
        name: adapter name; ``"*"`` is reserved.
        rank: LoRA rank.
        alpha: lora_alpha (scale alpha / rank).
        targets: module-name suffixes; default ``UNET_LORA_TARGETS``.
    """
    if name == ANY:
        raise ValueError(f"{ANY!r} is reserved for use_adapter (leave the UNet as it is)")
    state = _snapshot(unet) if _lora_layers(unet)[0] else None
    config = lora_config(rank, alpha, UNET_LORA_TARGETS if targets is None else targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=name)
    if state is not None:
        _restore(unet, state)
    params = adapter_parameters(unet, name)
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def use_adapter(unet: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Run a block with one adapter active, or with adapters disabled, then put everything back.

    Every LoRA parameter's ``requires_grad`` is exactly as before (inside the block and after it), and on exit the
    previously active adapters and enabled state return. Nesting works. Gradients of a forward inside the block
    reach only the active adapter's weights: the others are not in the graph.

    With gradient checkpointing on, call ``backward`` inside the block: the recomputed forward uses whatever
    adapter is active at backward time (outside the block, that gives silently wrong gradients).

    Args:
        unet: the (possibly shared) model.
        name: an adapter name (only that adapter active); ``None`` for adapters disabled (the bare base model: the
            teacher in shared-base mode); ``"*"`` to leave the model as it is (e.g. it has no adapters).
    """
    if name == ANY or (name is None and not _lora_layers(unet)[0]):
        yield unet
        return
    adapters = list(getattr(unet, "peft_config", None) or ())
    if name is not None and name not in adapters:
        raise ValueError(f"no adapter {name!r} on this model; adapters: {adapters}")
    state = _snapshot(unet)
    try:
        _activate(unet, None if name is None else [name], enabled=name is not None)
        for p, flag in state[2]:
            p.requires_grad_(flag)
        yield unet
    finally:
        _restore(unet, state)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Gradient checkpointing whose recomputation replays the adapter state of the original forward.

    Plain checkpointing recomputes a block at backward time with whatever adapter is active *then*; in shared-base
    mode one backward can cover forwards of two adapters (DMD2's generator loss runs the student and, for the GAN
    term, the fake score), so each checkpointed block records the active adapters at forward time and restores
    them around its recomputation (``torch.utils.checkpoint``'s ``context_fn``).
    """
    import torch.utils.checkpoint as tuc

    @contextmanager
    def replay(active, enabled):
        state = _snapshot(unet)
        try:
            _activate(unet, active, enabled)
            for p, flag in state[2]:
                p.requires_grad_(flag)
            yield
        finally:
            _restore(unet, state)

    def checkpoint(module, *args):
        if not _lora_layers(unet)[0]:
            return tuc.checkpoint(module.__call__, *args, use_reentrant=False)
        active, enabled, _ = _snapshot(unet)
        return tuc.checkpoint(
            module.__call__,
            *args,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), replay(active, enabled)),
        )

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def adapter_state_dict(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights with the keys ``save_lora_weights(unet_lora_layers=...)`` expects.

    The keys are peft's (``<module>.lora_A.weight`` / ``lora_B``), without the adapter name; diffusers adds the
    ``unet.`` prefix when saving. (``convert_state_dict_to_diffusers`` is deliberately not applied: it renames only
    attention keys to the legacy ``lora.down/up`` form, and diffusers' loader, which decides the format from the
    first key, then silently drops those attention LoRAs.)

    Args:
        unet: the model carrying the adapter.
        name: adapter name.
    """
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=name)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def adapter_metadata(unet: nn.Module, name: str) -> dict:
    """The adapter's ``LoraConfig`` as a dict (for ``unet_lora_adapter_metadata``), so loaders get the exact
    rank and alpha (without it diffusers assumes alpha = rank, i.e. scale 1).

    Args:
        unet: the model carrying the adapter.
        name: adapter name.
    """
    cfg = unet.peft_config[name].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def kohya_state_dict(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter in kohya/ComfyUI form: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    ``convert_state_dict_to_kohya`` writes alpha = rank (scale 1); here each ``.alpha`` is the module's real
    ``scaling * rank``, so kohya loaders (scale = alpha / rank) reproduce peft's output.

    Args:
        unet: the model carrying the adapter.
        name: adapter name.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in adapter_state_dict(unet, name).items()})
    alphas = {}
    for mod_name, layer in _lora_layers(unet)[0]:
        if name in getattr(layer, "scaling", {}):
            alphas[f"lora_unet_{mod_name.replace('.', '_')}.alpha"] = torch.tensor(
                float(layer.scaling[name] * layer.r[name]), dtype=torch.float32
            )
    stale = {k for k in sd if k.endswith(".alpha")} ^ set(alphas)
    if stale:
        raise RuntimeError(f"kohya alpha keys do not match the adapter's modules: {sorted(stale)[:5]}")
    sd.update(alphas)
    return sd


def save_lora(out_dir: str | Path, unet: nn.Module, name: str, pipeline_cls) -> dict[str, Path]:
    """Write one adapter as ``pytorch_lora_weights.safetensors`` (diffusers) and ``kohya_lora.safetensors``.

    ``pipe.load_lora_weights(out_dir)`` loads the first, ``weight_name="kohya_lora.safetensors"`` the second.

    Args:
        out_dir: folder (created).
        unet: the model carrying the adapter.
        name: adapter name.
        pipeline_cls: the family's pipeline class, e.g. ``StableDiffusionXLPipeline``.

    Returns:
        ``{"diffusers": path, "kohya": path}``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        out_dir,
        unet_lora_layers=adapter_state_dict(unet, name),
        unet_lora_adapter_metadata=adapter_metadata(unet, name),
        weight_name=DIFFUSERS_WEIGHT_NAME,
    )
    kohya = out_dir / KOHYA_WEIGHT_NAME
    save_file(kohya_state_dict(unet, name), str(kohya), metadata={"format": "pt"})
    return {"diffusers": out_dir / DIFFUSERS_WEIGHT_NAME, "kohya": kohya}


def _key_format(key: str) -> str | None:
    if _DIFFUSERS_KEY.match(key):
        return "diffusers"
    if _KOHYA_KEY.match(key):
        return "kohya"
    return None


def validate_lora_file(path: str | Path, unet: nn.Module | None = None) -> str:
    """Check a LoRA file before loading it and return its format: ``"diffusers"`` or ``"kohya"``.

    Args:
        path: a ``.safetensors`` file (pickle formats are refused: loading them can run code).
        unet: the base UNet the LoRA goes on, whenever the caller has it: every UNet module the LoRA targets must
            exist in it (after diffusers' own kohya/SGM key conversion, i.e. as ``load_lora_weights`` would map
            them), and every ``lora_A`` / ``lora_B`` tensor of a linear or conv module must have the shape peft
            gives that module's LoRA (``_lora_shape``): what loading it would otherwise fail on. None checks the
            keys' format only.

    Raises:
        LoRAFormatError: wrong suffix, keys of neither format (or of both), modules the UNet lacks, or a tensor
            of the wrong shape (naming the first such key, in sorted order).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAFormatError(
            f"{path}: only .safetensors LoRA files are loaded (got {path.suffix or 'no suffix'!r})"
        )
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if not keys:
        raise LoRAFormatError(f"{path}: no tensors in the file; {_EXPECTED}")
    by_format: dict[str | None, list[str]] = {}
    for k in keys:
        by_format.setdefault(_key_format(k), []).append(k)
    if None in by_format:
        bad = by_format[None]
        raise LoRAFormatError(
            f"{path}: {len(bad)} of {len(keys)} keys are not LoRA keys, e.g. {bad[:5]}; {_EXPECTED}"
        )
    if len(by_format) > 1:
        examples = {fmt: ks[:2] for fmt, ks in by_format.items()}
        raise LoRAFormatError(f"{path}: mixes diffusers and kohya keys {examples}; {_EXPECTED}")
    if unet is not None:
        _check_targets(path, unet, keys)
    return next(iter(by_format))


def _check_targets(path: Path, unet: nn.Module, keys: list[str]) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    try:  # map keys as load_lora_weights does (kohya and SGM names -> diffusers module paths)
        sd, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(load_file(str(path)), unet_config=unet.config)
        sd = convert_unet_state_dict_to_peft(
            {k[len("unet.") :]: v for k, v in sd.items() if k.startswith("unet.")}
        )
    except Exception as e:  # diffusers' key conversion failing is a format problem of the file
        raise LoRAFormatError(f"{path}: diffusers cannot map its keys onto a UNet ({e}); {_EXPECTED}") from e
    targets = {k.rsplit(".lora_", 1)[0] for k in sd}
    modules = dict(unet.named_modules())
    foreign = sorted(targets - set(modules))
    if foreign:
        prefixes = tuple(p for m in foreign for p in (f"unet.{m}.", f"lora_unet_{m.replace('.', '_')}."))
        bad_keys = [k for k in keys if k.startswith(prefixes)][:5]
        raise LoRAFormatError(
            f"{path}: {len(foreign)} LoRA target modules do not exist in this UNet, e.g. {foreign[:5]}"
            f"{f' (keys {bad_keys})' if bad_keys else ''}; a LoRA for another model family?"
        )
    for key in sorted(sd):
        module, part = key.rsplit(".lora_", 1)
        down = sd.get(f"{module}.lora_A.weight")
        rank = down.shape[0] if down is not None and down.ndim else None
        expected = _lora_shape(modules[module], part, rank)
        if expected is not None and tuple(sd[key].shape) != expected:
            base = getattr(modules[module], "base_layer", modules[module])
            raise LoRAFormatError(
                f"{path}: LoRA key {_file_key(module, part, keys)!r} has shape {tuple(sd[key].shape)}, but this "
                f"UNet's {module} ({base}) needs {expected}; a LoRA for another model family?"
            )


def _lora_shape(module: nn.Module, part: str, rank: int | None) -> tuple[int, ...] | None:
    """The shape peft gives ``part`` (``"A.weight"``, ``"B.weight"``, ``"B.bias"``) of a rank-``rank`` LoRA on
    ``module`` (a linear or conv layer, or a peft layer wrapping one); None where it is not checked (other layer
    kinds, or no ``lora_A`` to read the rank from)."""
    base = getattr(module, "base_layer", module)
    if rank is None and part != "B.bias":
        return None
    if isinstance(base, nn.Linear):
        shapes = {"A.weight": (rank, base.in_features), "B.weight": (base.out_features, rank)}
    elif isinstance(base, nn.Conv2d):
        shapes = {
            "A.weight": (rank, base.in_channels, *base.kernel_size),
            "B.weight": (base.out_channels, rank, 1, 1),
        }
    else:
        return None
    out_features = shapes["B.weight"][0]
    return {**shapes, "B.bias": (out_features,)}.get(part)


def _file_key(module: str, part: str, keys: list[str]) -> str:
    """The file's own key of ``module``'s LoRA ``part`` (diffusers, legacy ``lora.down``/``up`` or kohya names), or
    the converted key where the file names it otherwise."""
    legacy = {"A.weight": "lora.down.weight", "B.weight": "lora.up.weight", "B.bias": "lora.up.bias"}
    kohya = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight", "B.bias": "lora_up.bias"}
    candidates = (
        f"unet.{module}.lora_{part}",
        f"unet.{module}.{legacy[part]}",
        f"lora_unet_{module.replace('.', '_')}.{kohya[part]}",
    )
    present = set(keys)
    return next((k for k in candidates if k in present), f"{module}.lora_{part}")


def unique_parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of parameter memory behind ``modules``, each underlying storage counted once.

    Two denoisers that share one UNet count it once; views into one flat buffer count the buffer once.

    Args:
        modules: any modules.
    """
    seen: dict[object, int] = {}
    params: Iterable[nn.Parameter] = (p for m in modules for p in m.parameters())
    for p in params:
        storage = p.untyped_storage()
        ptr = storage.data_ptr()
        key = (str(p.device), ptr) if ptr else ("id", id(p))  # meta / empty tensors have no address
        seen[key] = storage.nbytes()
    return sum(seen.values())


def named_adapter_parameters(unet: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """``adapter_parameters`` keyed by their names in ``unet`` (stable keys for checkpoints)."""
    names = {id(p): n for n, p in unet.named_parameters(remove_duplicate=False)}
    return {names[id(p)]: p for p in adapter_parameters(unet, name)}


# --- which base a LoRA goes on ----------------------------------------------------------------------------------
FINGERPRINT_SAMPLES = 256  # values hashed per tensor, at a fixed stride
LORA_INFO_FILE = "fastdiff_lora.json"  # the LoRA's base, written into each exported LoRA folder


def unet_fingerprint(unet: nn.Module, dtype: torch.dtype = torch.float32) -> str:
    """A short hash of a UNet's base weights: enough to tell the teacher UNet from the same UNet with a LoRA fused in.

    It hashes, for every entry of ``unet.state_dict()`` in name order: the name, the shape, and at most
    ``FINGERPRINT_SAMPLES`` values of the flattened tensor taken at a fixed stride (``ceil(numel / 256)``), cast to
    ``dtype`` (default float32, whatever the tensor's own dtype) and read on the CPU. The device the UNet lives on
    does not change it; the dtype it was loaded in does (a float32 load and a float16 load of one file round
    differently), so compare fingerprints taken at the UNet's own precision. A LoRA loaded but not fused (peft
    layers) leaves it unchanged: its ``lora_*`` weights are skipped and ``base_layer`` names read as the plain ones.

    Returns:
        16 hex digits of a SHA-256.
    """
    import hashlib

    digest = hashlib.sha256()
    entries = {}
    for name, tensor in unet.state_dict().items():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        entries[".".join(p for p in parts if p != "base_layer")] = tensor
    for name in sorted(entries):
        tensor = entries[name].detach()
        flat = tensor.reshape(-1)
        stride = max(1, -(-flat.numel() // FINGERPRINT_SAMPLES))
        values = flat[::stride].to("cpu", dtype).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def lora_base_record(unet: nn.Module, teacher: str, teacher_path: str, loras: list[str]) -> dict:
    """fastdiff.json's ``lora_base``: the UNet (the teacher's, loaded in float32) every LoRA of ``loras`` (folders
    relative to the export) was trained on, with its fingerprint at float32 and at the half precisions a user may
    load the teacher in."""
    return {
        "teacher": teacher,
        "teacher_path": teacher_path,
        "loras": list(loras),
        "unet_fingerprint": unet_fingerprint(unet),
        "unet_fingerprint_by_dtype": {
            str(d).removeprefix("torch."): unet_fingerprint(unet, d) for d in (torch.float16, torch.bfloat16)
        },
    }


def check_lora_base(unet: nn.Module, data: dict, where: str) -> None:
    """Refuse to put an exported LoRA on a UNet other than the one it was trained on.

    ``data`` is an export's fastdiff.json (or a LoRA folder's ``fastdiff_lora.json``) as a dict; its ``lora_base``
    records the teacher and the fingerprint of its UNet. The fingerprint is taken at ``unet``'s own dtype (float32,
    or float16 / bfloat16 where the record has one for it). A no-op when ``data`` records no fingerprint (exports
    older than the record) or none at ``unet``'s dtype.

    Raises:
        ValueError: one line naming ``where``, the teacher and both fingerprints.
    """
    base = data.get("lora_base") or {}
    dtype = next(unet.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    expected = base.get("unet_fingerprint") if dtype == torch.float32 else None
    expected = expected or (base.get("unet_fingerprint_by_dtype") or {}).get(name)
    if not expected:
        return
    actual = unet_fingerprint(unet, dtype)
    if actual != expected:
        raise ValueError(
            f"{where}: this LoRA was trained on {base.get('teacher')} (fingerprint {expected}, {name}); the pipeline "
            f"it is loaded on has different UNet weights ({actual}) — e.g. the export's pipeline/, which already "
            "has it fused: load the LoRA on the teacher"
        )
