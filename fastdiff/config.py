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
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
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
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
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
class SiDConfig:
    """SiD, score identity distillation (Zhou et al. 2024), with SiD-LSG guidance (Zhou et al. 2025) and the
    few-step uniform mixture, Zero-CFG and Anti-CFG (Zhou, Gu, Wang 2025); defaults: the SiD-LSG SD1.5 reference."""

    alpha: float = 1.0  # α in (y_r - y_f)·[(y_r - x) - α (y_r - y_f)]; 1.2 is the SiD paper's other setting
    guidance: str = "lsg"  # cfg | lsg | zero_cfg | anti_cfg
    guidance_scale: float = 1.5  # cfg: teacher CFG; lsg: κ1..κ4 (1.5 best FID); not used by zero/anti_cfg
    lsg_scales: list[float] | None = None  # lsg: explicit [κ1, κ2, κ3, κ4] instead of guidance_scale
    anti_cfg_scale: float = -0.5  # anti_cfg: λ in (-1, 0); the fake score is f(c) + λ (f(c) - f(∅))
    prompt_dropout: float = 0.1  # lsg / anti_cfg: empty-prompt rate while training the fake score
    weighting: str = "mean_abs"  # mean_abs: 1 / mean|x - y_r| per sample (reference) | snr: sqrt(1 + SNR(t))
    num_steps: int = 1  # K: the generator learns the uniform mixture of its 1..K-step outputs
    init_timestep: int = 625  # t of the first generator step (input: pure noise); few-step: 999
    min_step: int = 20  # t ~ U[min_step, max_step) for the generator and fake-score losses
    max_step: int = 980
    generator: str = "full"  # full | lora
    fake_score: str = "full"  # full | lora
    shared_base: bool = False  # generator and fake score as two adapters on the one frozen teacher UNet
    lora_rank: int = 64
    lora_alpha: int = 8
    generator_lr: float = 1.0e-6
    fake_lr: float = 1.0e-6
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam, as the reference
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
    max_grad_norm: float | None = None  # the reference clips only in fp16
    gan: str = "auto"  # auto (on when a dataset of real images is given) | on | off
    gan_generator_weight: float = 5e-3  # λ_G (DMD2's SDXL weights; the head is DMD2's)
    gan_critic_weight: float = 1e-2
    ema_decay: float | None = None


@dataclass
class AGDConfig:
    """AGD, adapter guidance distillation (Jensen & Sadat 2025); defaults: the card and the reference
    (cristianpjensen/agd): w ~ U[1, 12], AdamW lr 1e-4, cosine with 10% warm-up, 5k steps."""

    # trajectories: the teacher with CFG w on a diffusers scheduler, every step stored (fastdiff.trajectories)
    trajectories: str | None = None  # shard folder; default <output_dir>/trajectories
    w_min: float = 1.0  # w ~ U[w_min, w_max] per trajectory
    w_max: float = 12.0
    num_trajectories: int | None = None  # default: one per prompt
    num_inference_steps: int = 50  # teacher steps per trajectory (reference: ~1000); also the export's
    scheduler: str | None = None  # diffusers scheduler class; default: the teacher's own
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {timestep_spacing: trailing}
    negative_prompt_prob: float = 0.0  # chance that a trajectory's CFG guides away from a negative prompt
    negative_prompts: str | None = None  # .txt/.jsonl of negative prompts; default: other training prompts
    shard_size: int = 64  # trajectories per safetensors shard
    trajectory_batch_size: int = 8  # trajectories sampled together
    trajectory_dtype: str = "float16"  # float32 | float16 | bfloat16 (stored x_t and targets)
    # adapters (fastdiff.models.adapters)
    hidden_dim: int = 320
    num_heads: int = 1
    mlp_ratio: float = 1.0
    use_timestep: bool = True
    use_prompt: bool = True
    use_negative_prompt: bool = True
    gate_by_w: bool = True  # residuals scaled by (w - 1): w = 1 is exactly the conditional model
    adapter_seed: int = 0  # seed of the fixed Fourier features
    # training
    lr: float = 1.0e-4
    lr_schedule: str = "cosine"  # cosine | constant (after the warm-up)
    warmup_steps: int = 500
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    # export: the recipe recorded in fastdiff.json (any w in [w_min, w_max] and any scheduler work)
    guidance_scale: float = 5.0  # recommended w (SDXL 5-8, SD1.5 7.5, tiny teachers 1-2)


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
    cache_latents: bool = False  # keep each real image's VAE posterior (mean, std) in memory after first use
    cpu_threads: int | None = (
        None  # CPU torch threads per process; 0 = cores / processes; None = the launcher's
    )
    max_consecutive_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    export: bool = True  # export pipeline/ + lora/ + fastdiff.json at the end
    lora_scale: float = 1.0  # recommended LoRA scale written to fastdiff.json
    dmd2: DMD2Config = field(default_factory=DMD2Config)
    tscd: TSCDConfig = field(default_factory=TSCDConfig)
    agd: AGDConfig = field(default_factory=AGDConfig)
    sid: SiDConfig = field(default_factory=SiDConfig)


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
