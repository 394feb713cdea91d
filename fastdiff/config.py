"""Structured configs: a YAML recipe plus ``key=value`` overrides, checked against dataclasses.

The shared keys are declared here (``TrainConfig``, ``OptimizerConfig``); each method declares its own section (a
dataclass next to the method, registered with it: ``fastdiff.methods.registry``). A run's config holds the shared keys
and the selected method's section only, under the method's name (``dmd2:``). An unknown key is an error that names
the key, where it came from, and the keys allowed at that level.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class OptimizerConfig:
    """The optimizer settings every parameter group of a method shares (the ``optim`` sub-section of a method's
    section); learning rates are per group and stay in the method's section."""

    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes, GPU only)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, in this group's updates
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
    max_grad_norm: float | None = None  # gradient clipping (None: off)


def optim_field(**defaults) -> Any:
    """A dataclass field for a method's ``optim`` sub-section with that method's defaults."""
    return field(default_factory=lambda: OptimizerConfig(**defaults))


@dataclass
class TrainConfig:
    """Everything one distillation run needs: the shared keys, plus ``section``, the selected method's own config
    (saved and loaded under the method's name, e.g. ``dmd2:``)."""

    method: str = "dmd2"
    teacher: str | None = None  # local diffusers pipeline folder
    output_dir: str = "out"
    seed: int = 0
    max_steps: int = 1000
    train_batch_size: int = 4
    resolution: int | None = None  # image side in pixels; default: the teacher's native size
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # no | fp16 | bf16 | null (accelerate's: ACCELERATE_MIXED_PRECISION)
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (torch's) | xformers (CUDA only; pip install 'fastdiff[xformers]')
    parallel: str = "ddp"  # ddp (gradients all-reduced) | fsdp (full-copy UNets sharded per block, FSDP2)
    fsdp_shard_frozen: bool = True  # fsdp: shard the frozen teacher UNet too (false: a full copy per rank)
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 500
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a photo of a cat", "a watercolor landscape"]
    )
    num_validation_images: int = 4
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard,wandb | all (those installed)
    tracker_project: str = "fastdiff"
    prompts: str | None = None  # .txt / .jsonl prompt file (data-free methods need only prompts)
    dataset: str | None = None  # real images: a folder, .csv/.json/.jsonl/.parquet file or saved HF dataset
    image_column: str | None = None  # dataset's image column; null: file_name/image/image_path/file/path
    caption_column: str | None = None  # dataset's caption column; null: text/caption/prompt, first found
    dataloader_num_workers: int = 0  # processes decoding dataset images ahead (0: the training process)
    cache_latents: bool = False  # keep each real image's VAE posterior (mean, std) in memory after first use
    cache: str | None = None  # `fastdiff cache` folder: batches read from it; text encoders moved to the CPU
    cpu_threads: int | None = (
        None  # CPU torch threads per process; 0 = cores / processes; None = the launcher's
    )
    max_consecutive_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    export: bool = True  # export pipeline/ + lora/ + fastdiff.json at the end
    lora_scale: float = 1.0  # recommended LoRA scale written to fastdiff.json
    section: Any = field(
        default=None, repr=False
    )  # the method's config (not a key: it is read under its name)


_NOT_KEYS = {"section"}


def _allowed(schema: type) -> dict:
    return {f.name: f for f in dataclasses.fields(schema) if f.name not in _NOT_KEYS}


def _check_keys(data: Any, schema: type, where: str, path: str = "") -> None:
    """Raise ConfigError for keys that ``schema`` (a dataclass) does not declare, recursively."""
    if not isinstance(data, dict):
        return
    allowed = _allowed(schema)
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in allowed:
            raise ConfigError(
                f"unknown config key '{full}' in {where}; allowed keys here: {', '.join(sorted(allowed))}"
            )
        factory = allowed[key].default_factory
        sub = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            _check_keys(value, type(sub), where, f"{full}.")


def _parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` -> {"a": {"b": 1}}; values are typed as YAML reads them (ints, floats, lists, null)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _yaml(value) if value else None
    return out


def _read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping of config keys")
    return data


def _merge(schema: type, layers: list[dict]):
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except Exception as e:  # type errors from OmegaConf: say which key
        raise ConfigError(f"bad config value: {e}") from None


def _to_object(merged):
    try:
        return OmegaConf.to_object(merged)
    except Exception as e:
        raise ConfigError(f"bad config value: {e}") from None


def merge_layers(schema: type, path: str | Path | None, overrides: list[str] | tuple):
    """YAML file + ``key=value`` overrides merged onto the dataclass ``schema``, unknown keys refused."""
    layers = []
    if path is not None:
        data = _read_file(path)
        _check_keys(data, schema, str(path))
        layers.append(data)
    over = _parse_overrides(list(overrides))
    _check_keys(over, schema, "command-line overrides")
    layers.append(over)
    return _merge(schema, layers)


def build_config(layers: list[tuple[str, dict]]) -> TrainConfig:
    """Merge named layers (where each came from, its keys) into a TrainConfig with the selected method's section.

    The method is the last layer's ``method`` (default ``dmd2``); its section is read under its name. A section
    for another registered method, an unknown method and an unknown key are errors.
    """
    from .methods import registry

    method = "dmd2"
    for _, data in layers:
        method = data.get("method", method)
    section_cls = registry.get(str(method)).config
    shared, sections = [], []
    for where, data in layers:
        data = dict(data)
        section = data.pop(str(method), None)
        for other in registry.names():
            if other in data:
                raise ConfigError(
                    f"config section '{other}' in {where} belongs to method {other}, but the method is {method}"
                )
        _check_keys(data, TrainConfig, where)
        shared.append(data)
        if section is not None:
            if not isinstance(section, dict):
                raise ConfigError(f"config section '{method}' in {where} must be a mapping of keys")
            _check_keys(section, section_cls, where, f"{method}.")
            sections.append(section)
    cfg = _to_object(_merge(TrainConfig, shared))
    cfg.section = _to_object(_merge(section_cls, sections))
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"parallel={cfg.parallel!r}: use ddp or fsdp")
    check_ranges(cfg, "")
    check_ranges(cfg.section, f"{method}.")
    return cfg


def check_ranges(config, prefix: str) -> None:
    """Numbers a run cannot use are ConfigErrors naming the key: every number must be finite; a count (an int
    key) must be >= 0, and >= 1 where its default is (steps between events, ratios, ranks, batch sizes: 0 would
    divide by zero or train nothing; timesteps such as ``min_step`` excepted); a learning rate (a key ending in ``lr``) must be > 0. Nested sections (e.g.
    ``optim``) are checked with their prefix."""
    for f in dataclasses.fields(config):
        if f.name in _NOT_KEYS:
            continue
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise ConfigError(f"{key}={v} is not a finite number")
            if isinstance(v, int) and v < 0:
                raise ConfigError(f"{key}={v} must be >= 0")
            timestep = f.name.endswith(("_step", "timestep"))  # a timestep, e.g. min_step: 0 is one
            if (
                isinstance(v, int)
                and isinstance(default, int)
                and not isinstance(default, bool)
                and default >= 1
                and not timestep
                and v < 1
            ):
                raise ConfigError(f"{key}={v} must be >= 1")
            if f.name.endswith("lr") and v <= 0:
                raise ConfigError(f"{key}={v}: a learning rate must be > 0")


PRECISIONS = ("no", "fp16", "bf16")


def resolve_mixed_precision(value: str | None, where: str = "the config") -> str:
    """The precision a run uses: the config's ``mixed_precision`` (set in ``where``), or, when it is null,
    accelerate's: ``ACCELERATE_MIXED_PRECISION`` (``accelerate launch --mixed_precision``, ``accelerate config``),
    else "no".

    ``accelerate launch`` sets the variable on every launch, to "no" when nothing was asked for, so only fp16 / bf16
    there count as a request: a config value that differs from such a request is an error naming both.
    """
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if env is not None and env not in PRECISIONS:
        raise ConfigError(
            f"ACCELERATE_MIXED_PRECISION={env} (from the environment: accelerate launch / accelerate config) "
            f"is not supported; fastdiff trains in one of {', '.join(PRECISIONS)}"
        )
    if value is None:
        return env or "no"
    if value not in PRECISIONS:
        raise ConfigError(
            f"mixed_precision={value} in {where} must be one of {', '.join(PRECISIONS)} or null"
        )
    if env not in (None, "no", value):
        raise ConfigError(
            f"mixed_precision={value} in {where} conflicts with ACCELERATE_MIXED_PRECISION={env} (from the "
            "environment: `accelerate launch --mixed_precision` or `accelerate config`); make them agree, or set "
            "mixed_precision=null to use accelerate's"
        )
    return value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple = (), require_teacher: bool = True
) -> TrainConfig:
    """Load a recipe and apply ``key=value`` overrides (dotted keys reach sections: ``dmd2.generator_lr=1e-5``).
    ``mixed_precision`` comes back resolved (``resolve_mixed_precision``): the value the run will use."""
    layers = [(str(path), _read_file(path))] if path is not None else []
    layers.append(("command-line overrides", _parse_overrides(list(overrides))))
    cfg = build_config(layers)
    if require_teacher and cfg.teacher in (None, "", "???"):
        raise ConfigError(
            "no teacher given: set `teacher=<local diffusers folder>` in the config or on the command line"
        )
    where = [w for w, data in layers if data.get("mixed_precision") is not None]
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision, where[-1] if where else "the config")
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    """The plain config: shared keys, and the method's section under its name (what checkpoints save)."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_KEYS}
    if cfg.section is not None:
        out[cfg.method] = dataclasses.asdict(cfg.section)
    return out


def from_dict(data: dict) -> TrainConfig:
    return build_config([("saved config", data)])


def field_comments(schema: type) -> dict[str, str]:
    """Each field's trailing ``# ...`` comment in the source of the dataclass ``schema`` (and its dataclass bases),
    the comments of a field written over several lines joined; {} where the source cannot be read."""
    out: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        comments = {  # line number -> comment text
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                lines = range(node.lineno, node.end_lineno + 1)
                text = " ".join(comments[n] for n in lines if n in comments)
                if text:
                    out[node.target.id] = text
    return out


def _flow(value: Any) -> str:
    """A value as YAML writes it on one line (``null``, ``'no'``, ``[0.9, 0.999]``)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9, allow_unicode=True).strip()[1:-1]


def _describe(value: Any, default: Any, indent: str) -> list[str]:
    comments = field_comments(type(value))
    lines = []
    for f in dataclasses.fields(value):
        if f.name in _NOT_KEYS:
            continue
        current, initial = getattr(value, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(current):
            lines += [f"{indent}{f.name}:", *_describe(current, initial, indent + "  ")]
            continue
        meaning = f"; {comments[f.name]}" if f.name in comments else ""
        lines.append(f"{indent}{f.name}: {_flow(current)}  # default {_flow(initial)}{meaning}")
    return lines


def describe(cfg: TrainConfig) -> str:
    """Every key of a run's config, shared and the method's section (recursively), as YAML: its current value, and
    in a comment its default and its meaning (the field's comment in the dataclass source, where it has one)."""
    lines = _describe(cfg, TrainConfig(), "")
    if cfg.section is not None:
        lines += [f"{cfg.method}:", *_describe(cfg.section, type(cfg.section)(), "  ")]
    return "\n".join(lines)
