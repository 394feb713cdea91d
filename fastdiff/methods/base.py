"""The interface between a method (the only place that knows an algorithm) and the trainer (which knows none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Group:
    """A named set of parameters with its own optimizer, learning rate and update interval.

    The two-time-scale rule is just intervals: DMD2's ``generator`` group has ``interval=5`` and its ``critic``
    group ``interval=1``. ``active`` replaces the interval where a schedule is not periodic from step 0 (e.g. MSD's
    students taking turns, or a phase that trains one group alone): the group is updated at step s when
    ``active(s)``. Within an iteration groups are updated in the order ``Method.groups()`` lists them.
    """

    name: str
    params: dict[str, nn.Parameter]  # stable names: they key the checkpoint files
    lr: float
    interval: int = 1
    active: Callable[[int], bool] | None = None  # the steps it is updated at (default: step % interval == 0)
    optimizer: str = "adamw"  # adamw | adamw8bit (see fastdiff.trainer.make_optimizer)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    ema_decay: float | None = None
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (to 0 at max_steps)
    # a factor on lr as a function of the group's update count (0-based), e.g. a phase of its own lr
    lr_multiplier: Callable[[int], float] | None = None

    def updates_at(self, step: int) -> bool:
        """Whether the group is updated at ``step``."""
        return self.active(step) if self.active is not None else step % self.interval == 0

    def num_updates(self, max_steps: int) -> int:
        """How many updates the group gets in ``max_steps`` iterations (its lr schedule's length)."""
        if self.active is None:
            return -(-max_steps // self.interval)
        return sum(1 for s in range(max_steps) if self.active(s))


@dataclass
class RunContext:
    """What a method is built from, in a training run or when a checkpoint is re-read for export.

    ``config`` is the method's own section, ``run`` the whole run config (seed, output_dir, ...). The data fields
    (``prompts``, ``dataset``) and the distributed fields are set in training runs only; ``prepared`` holds what the
    method's ``prepare`` stage returned (None when it has none or was not run).
    """

    teacher: Any  # a loaded fastdiff.teacher.Teacher
    config: Any
    run: Any
    resolution: int
    latent_shape: tuple[int, ...]
    with_real_data: bool = False
    prompts: list[str] | None = None
    dataset: Any = None
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    prepared: Any = None


@dataclass
class ExportedStudent:
    """What a method exports as its student: a diffusers UNet, whole (``adapter`` None) or as the named LoRA
    adapter on it (the base is then the teacher's UNet).

    ``variants`` (LoRA students only): more weights of the same adapter, each exported as a LoRA of its own in
    ``lora/<folder>/``: folder name -> the adapter's parameter tensors, named as in ``unet.named_parameters()``.
    A ``StepRecipe`` with ``lora="lora/<folder>"`` samples with them (e.g. TSCD's per-step-count LoRAs).
    """

    unet: nn.Module
    adapter: str | None = None
    variants: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Method(nn.Module):
    """A distillation method: declares its parameter groups, computes their losses, and samples its student.

    The contract everything outside ``fastdiff/methods/`` reads (nothing there knows a method by name):

    - registration: ``name`` and ``config`` (the dataclass of its config section), ``@register`` on the class;
    - construction: ``build(ctx)`` from a ``RunContext``; optional ``prepare(ctx)``, a stage run before ``build``
      in training (e.g. AGD's teacher trajectories), and ``batch_source(ctx)``, its own batches (default: prompts
      and real latents from the run's data);
    - training: ``groups()`` and ``loss(group, batch, step, generator)``, ``extra_state`` for resume;
    - sampling and export: ``generate`` (the student's sampler), ``exported_student()`` (the weights to export),
      ``recipe(scheduler_config)`` (how the export samples: ``fastdiff.recipe.Recipe``), and optionally
      ``export_pipeline`` / ``model_card`` where the method needs its own pipeline class and ``exported_loras``
      (more LoRA adapters to ship as ``lora/<name>/``).

    Methods hold networks and math only: no file paths, no accelerate, no I/O (stages may do I/O).
    """

    name = "method"
    config: type | None = None  # the dataclass of the method's config section
    keep_fp32: tuple[
        str, ...
    ] = ()  # submodules the trainer must not cast to half precision (e.g. EMA targets)
    own_data: bool = (
        False  # its stages bring training data of their own: a run needs neither prompts nor dataset
    )
    # the largest of an int over ranks (the trainer sets it when networks are sharded): a loss whose number of
    # network calls depends on its batch (e.g. backward simulation's k steps) calls ``agree_max`` so that every
    # rank makes the same calls (FSDP all-gathers weights inside each call)
    agree_max: Callable[[int], int] = staticmethod(int)

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, ctx: RunContext) -> Method:
        """The method on ``ctx.teacher`` with ``ctx.config`` (its section)."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, ctx: RunContext) -> Any:
        """An optional stage before ``build`` in training runs (resumable, split over ``ctx.rank``); its result
        lands in ``ctx.prepared``."""
        return None

    def batch_source(self, ctx: RunContext) -> Callable | None:
        """``batch_fn(step, micro, generator) -> dict`` when the method brings its own batches, else None."""
        return None

    def batch_indices(self, ctx: RunContext) -> Callable | None:
        """``indices(step, micro) -> list[int]``, which training items (dataset rows or prompt lines) this rank's
        micro-batch holds, when the method chooses them (e.g. MSD: one student's partition); None: the run's
        shuffled epochs. The standard batches carry them as ``batch["indices"]``."""
        return None

    # --- training ---------------------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        raise NotImplementedError

    def loss(self, group: str, batch: dict, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Named scalar loss terms for ``group`` (the trainer sums them); draw all randomness from ``generator``."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors outside the parameter groups that a resume needs (e.g. an EMA target network)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_state`` returned."""

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every diffusers model inside, replaying each forward's LoRA adapter on recomputation."""
        from ..models.lora import enable_gradient_checkpointing

        seen = set()
        for m in self.modules():
            if getattr(m, "_supports_gradient_checkpointing", False) and id(m) not in seen:
                seen.add(id(m))
                enable_gradient_checkpointing(m)

    # --- sampling and export ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise: torch.Tensor, cond, timesteps=None, generator=None) -> torch.Tensor:
        """The student's sampler: x0 from initial noise; ``timesteps`` a step count or a list (None: the default)."""
        raise NotImplementedError

    def exported_student(self) -> ExportedStudent:
        """The student's weights as a diffusers model (the standard pipeline export writes them)."""
        raise NotImplementedError

    def exported_loras(self) -> dict[str, ExportedStudent]:
        """More LoRA adapters to export, each as ``lora/<name>/`` in both formats (e.g. MSD's students)."""
        return {}

    def recipe(self, scheduler_config: dict):
        """How the export samples (``fastdiff.recipe.Recipe``), given the teacher's scheduler config."""
        raise NotImplementedError

    def export_pipeline(self, teacher):
        """A pipeline of the method's own to save instead of the standard one (None: the standard pipeline with
        ``exported_student`` and the recipe's scheduler)."""
        return None

    def model_card(self, recipe: dict, grid: str) -> str | None:
        """The export's README.md (None: the standard model card)."""
        return None


def optimizer_settings(optim, where: str) -> dict:
    """A group's optimizer keyword arguments from a method's ``optim`` sub-section (named ``where`` in errors)."""
    if optim.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"{where}.optim.lr_schedule must be constant or cosine, got {optim.lr_schedule!r}")
    if optim.optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"{where}.optim.optimizer must be adamw or adamw8bit, got {optim.optimizer!r}")
    return dict(
        optimizer=optim.optimizer,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
        eps=optim.eps,
        warmup_steps=optim.warmup_steps,
        max_grad_norm=optim.max_grad_norm,
        lr_schedule=optim.lr_schedule,
    )


def randn(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved (reproducible across devices)."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randint(low: int, high: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(device)
