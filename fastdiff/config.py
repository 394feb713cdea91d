"""Structured configs: a YAML recipe plus ``key=value`` overrides, checked against dataclasses.

Every key is declared here; an unknown key is an error that names the key, where it came from, and the keys
allowed at that level. Method sections (``dmd2:``) hold each method's own settings.
"""

from __future__ import annotations

import dataclasses
import re
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
class DMD2Config:
    """DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"); defaults are the SDXL reference."""

    guidance_scale: float = 8.0  # CFG w of the real score (SDXL 8, SD1.5 1.75)
    generator: str = "lora"  # lora | full
    fake_score: str = "lora"  # lora | full
    shared_base: bool = True  # generator and fake score as two adapters on the one frozen teacher UNet
    lora_rank: int = 64
    lora_alpha: int = 8
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    backward_simulation: bool = True  # multi-step: train on the student's own k-step outputs
    min_step: int = 20  # t ~ U[min_step, max_step] for the distribution-matching gradient
    max_step: int = 980
    generator_lr: float = 5e-5
    fake_lr: float = 5e-5
    dfake_gen_update_ratio: int = 5  # two-time-scale rule: generator updated once every N fake-score updates
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 500
    max_grad_norm: float = 10.0
    gan: str = "auto"  # auto (on when a dataset of real images is given) | on | off
    gan_generator_weight: float = 5e-3  # λ_G (SDXL 5e-3, SD1.5 1e-3)
    gan_critic_weight: float = 1e-2
    ema_decay: float | None = None  # the reference uses no EMA


@dataclass
class TSCDConfig:
    """TSCD / Hyper-SD (paper only); defaults from the PCM SD1.5 LoRA recipe where the paper gives none."""

    student: str = "lora"  # lora (adapter "student" on the teacher UNet) | full (copy + EMA target copy)
    lora_rank: int = 64
    lora_alpha: int = 8
    guidance_scale: float = 5.5  # standard CFG scale s (LCM-form w = s - 1; PCM SD1.5: w in [4, 5])
    num_ddim_timesteps: int = 50  # N solver steps over T
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # k per stage, in training order
    stage_steps: list[int] = field(default_factory=lambda: [5000] * 4)  # per stage; the last runs on
    loss_type: str = "huber"  # huber | l2
    huber_c: float = 0.001  # PCM / LCM-LoRA SD1.5
    lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-3
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    target_ema_decay: float = 0.95  # full mode: the target network is an EMA of the student (LCM)
    ema_decay: float | None = None  # the trainer's EMA of the student weights, for export
    adversarial_weight: float = 0.0  # PCM uses 0.1 when on
    discriminator_lr: float = 1e-5
    reward_weight: float = 0.0  # λ_R of the reward term on the one-step sample
    reward_model: str = "auto"  # digits | DigitClassifier folder | local CLIP folder | auto (digits teacher)
    dmd_weight: float = 0.0  # DMD term in the one-segment stage; needs a fake score
    fake_lr: float = 1e-5
    dmd_min_step: int = 20
    dmd_max_step: int = 980


@dataclass
class TrainConfig:
    """Everything one distillation run needs."""

    method: str = "dmd2"
    teacher: str | None = None  # local diffusers pipeline folder
    output_dir: str = "out"
    seed: int = 0
    max_steps: int = 1000
    train_batch_size: int = 4
    resolution: int | None = None  # image side in pixels; default: the teacher's native size
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 500
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a photo of a cat", "a watercolor landscape"]
    )
    num_validation_images: int = 4
    report_to: str = "none"  # none | tensorboard | wandb | all
    tracker_project: str = "fastdiff"
    prompts: str | None = None  # .txt / .jsonl prompt file (data-free methods need only prompts)
    dataset: str | None = (
        None  # image+caption folder or local HF datasets folder (real images: DMD2's GAN term)
    )
    max_consecutive_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    export: bool = True  # export pipeline/ + lora/ + fastdiff.json at the end
    lora_scale: float = 1.0  # recommended LoRA scale written to fastdiff.json
    dmd2: DMD2Config = field(default_factory=DMD2Config)
    tscd: TSCDConfig = field(default_factory=TSCDConfig)


def _check_keys(data: Any, schema: type, where: str, path: str = "") -> None:
    """Raise ConfigError for keys that ``schema`` (a dataclass) does not declare, recursively."""
    if not isinstance(data, dict):
        return
    allowed = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in allowed:
            raise ConfigError(
                f"unknown config key '{full}' in {where}; allowed keys here: {', '.join(sorted(allowed))}"
            )
        sub = (
            allowed[key].default_factory if allowed[key].default_factory is not dataclasses.MISSING else None
        )
        if sub is not None and dataclasses.is_dataclass(sub):
            _check_keys(value, sub, where, f"{full}.")


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


def merge_layers(schema: type, path: str | Path | None, overrides: list[str] | tuple):
    """YAML file + ``key=value`` overrides merged onto the dataclass ``schema``, unknown keys refused."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _yaml(path.read_text()) or {}
        _check_keys(data, schema, str(path))
        layers.append(data)
    over = _parse_overrides(list(overrides))
    _check_keys(over, schema, "command-line overrides")
    layers.append(over)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except Exception as e:  # type errors from OmegaConf: say which key
        raise ConfigError(f"bad config value: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """Load a recipe and apply ``key=value`` overrides (dotted keys reach sections: ``dmd2.generator_lr=1e-5``)."""
    merged = merge_layers(TrainConfig, path, overrides)
    teacher = None if OmegaConf.is_missing(merged, "teacher") else merged.teacher
    if teacher in (None, "", "???"):
        raise ConfigError(
            "no teacher given: set `teacher=<local diffusers folder>` in the config or on the command line"
        )
    try:
        return OmegaConf.to_object(merged)
    except Exception as e:
        raise ConfigError(f"bad config value: {e}") from None


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    _check_keys(data, TrainConfig, "saved config")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), data))
