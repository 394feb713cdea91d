"""How an export samples: the ``Recipe`` a method declares, written to ``fastdiff.json`` by export and read back by
``fastdiff generate``, ``fastdiff serve`` and ``fastdiff bench quality``. Inference side only: nothing here imports
training code.

A recipe names a diffusers scheduler (class + keyword arguments on top of the teacher's scheduler config) whose
``set_timesteps(num_inference_steps)`` gives the trained timesteps, so ``pipe(prompt, num_inference_steps=N,
guidance_scale=w)`` is the whole call. ``step_counts`` says which step counts the export may run at (None: any), and
``recipes`` gives a step count its own scheduler, guidance, timesteps, eta or LoRA where it differs. ``for_steps``
is the one place that decides what a requested step count means.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_FILE = "fastdiff.json"


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name`` (a ValueError for anything else)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"{name!r} is not a diffusers scheduler class (e.g. DDIMScheduler, LCMScheduler, "
            "EulerDiscreteScheduler, DPMSolverMultistepScheduler)"
        )
    return cls


def make_scheduler(base, name: str | None = None, kwargs: dict | None = None):
    """A fresh scheduler of class ``name`` (default: the base's own) from ``base``'s config (a scheduler, or a config
    dict naming its class in ``_class_name``), with ``kwargs`` overriding the config."""
    from diffusers import SchedulerMixin

    if isinstance(base, SchedulerMixin):
        config, default = dict(base.config), type(base).__name__
    else:
        config, default = dict(base), dict(base).get("_class_name")
    cls = scheduler_class(name or default)
    # only the keys the class takes: another class's keys (e.g. an Euler teacher's use_karras_sigmas) would be saved
    # with it and make every load warn
    own = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if k in own}
    return cls.from_config(config, **dict(kwargs or {}))


def derive_scheduler(scheduler_config: dict, timesteps: list[int], sampler: str = "lcm", also=()):
    """A scheduler (class name, kwargs) whose ``set_timesteps(len(timesteps))`` gives ``timesteps``; with a flag
    saying whether one was found (else LCMScheduler with explicit timesteps must be passed at call time).

    ``sampler`` is how the student samples: "lcm" (x0, then fresh noise to the next timestep: DMD2, SiD) or "ddim"
    (deterministic DDIM between trailing timesteps: consistency students such as TSCD). ``also``: more timestep
    lists the same scheduler must derive from their lengths (a student trained at several step counts):
    - K steps at LCM's own timesteps (e.g. [999, 749, 499, 249]): LCMScheduler(original_inference_steps=K);
    - one step at t != 999 (DMD2 SDXL's t=399): LCMScheduler(original_inference_steps=1, num_train_timesteps=t+1,
      trained_betas=the teacher's), whose one step returns the x0 prediction (LCM's boundary condition weights
      x_t by c_skip < 1e-7 at t >= 100) and which refuses any other step count before a UNet call;
    - uniform grids from 999 at several k: LCMScheduler(original_inference_steps=T) gives T-1 - floor(T i / k).
    """
    n = len(timesteps)
    wanted = [list(timesteps), *(list(ts) for ts in also)]
    exact = dict(clip_sample=False, set_alpha_to_one=True, thresholding=False)
    if sampler == "ddim":
        candidates = [("DDIMScheduler", dict(timestep_spacing="trailing", **exact))]
    else:
        candidates = [("LCMScheduler", {"original_inference_steps": n})]
        if n == 1 and timesteps[0] + 1 < scheduler_config.get("num_train_timesteps", 1000):
            # LCM's one-step grid is [num_train_timesteps - 1]: counting timesteps to t + 1 gives [t], with the
            # teacher's betas kept whole, and any other step count is refused at once (a DDIM config with
            # steps_offset = t samples 2 steps at [t + 500, t] and fails mid-run beyond)
            betas = make_scheduler(scheduler_config, "DDIMScheduler").betas.tolist()
            one = {
                "original_inference_steps": 1,
                "num_train_timesteps": timesteps[0] + 1,
                "trained_betas": betas,
            }
            candidates += [
                ("LCMScheduler", one),
                ("DDIMScheduler", dict(timestep_spacing="leading", steps_offset=timesteps[0], **exact)),
            ]
        candidates.append(
            ("LCMScheduler", {"original_inference_steps": scheduler_config.get("num_train_timesteps", 1000)})
        )

    def derives(name, kwargs, ts) -> bool:
        sched = make_scheduler(scheduler_config, name, kwargs)
        sched.set_timesteps(len(ts))
        return sched.timesteps.tolist() == ts

    for name, kwargs in candidates:
        if all(derives(name, kwargs, ts) for ts in wanted):
            return name, kwargs, True
    return (*candidates[0], False)


@dataclass
class StepRecipe:
    """How to sample at one step count. ``scheduler`` None: the export pipeline's saved scheduler; ``timesteps``
    only when no scheduler config derives them; ``eta``: the scheduler's stochasticity (TCD's γ), passed to the
    pipeline call and, in the export's self-check, to the method's ``generate``; ``lora``: a LoRA folder (relative
    to the export) fused into the teacher named by fastdiff.json's ``teacher`` for this step count, None for the
    exported ``pipeline/`` as it is (``load_step_pipeline`` loads either)."""

    num_inference_steps: int
    guidance_scale: float = 0.0
    scheduler: str | None = None
    scheduler_kwargs: dict = field(default_factory=dict)
    timesteps: list[int] | None = None
    eta: float | None = None
    lora: str | None = None
    call_extra: dict = field(default_factory=dict)  # more call arguments, e.g. the upscaler's noise_level

    def call_kwargs(self) -> dict:
        """The pipeline call arguments (besides the prompt and image) of this step count."""
        kw = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        kw.update(self.call_extra)
        if self.timesteps is not None:
            kw["timesteps"] = list(self.timesteps)
        if self.eta is not None:
            kw["eta"] = self.eta
        return kw

    def to_json(self) -> dict:
        out = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "scheduler_kwargs": self.scheduler_kwargs,
            "lora": self.lora,
        }
        out.update({k: v for k, v in (("timesteps", self.timesteps), ("eta", self.eta)) if v is not None})
        return out

    @classmethod
    def from_json(cls, data: dict) -> StepRecipe:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class Recipe:
    """The sampling part of ``fastdiff.json``.

    Args:
        method: the method's registered name.
        num_inference_steps / guidance_scale / timesteps: the default call and the timesteps it samples at.
        scheduler / scheduler_kwargs: the scheduler class and its kwargs on top of the teacher's scheduler config
            (the export's ``pipeline/scheduler`` holds the result).
        timesteps_derivable: False when the call must pass ``timesteps`` explicitly.
        sampler: what the student's sampler is (``lcm``, ``ddim``, ``scheduler``: any diffusers scheduler).
        step_counts: the step counts the export may run at; None: any.
        recipes: per-step-count overrides.
        extra: method-specific fields written to fastdiff.json as they are (e.g. AGD's trained w range).
        call_extra: more pipeline call arguments of every step count (e.g. the x4 upscaler's ``noise_level``),
            written to fastdiff.json as top-level keys, listed under ``call_extra``.
    """

    method: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: list
    scheduler: str
    scheduler_kwargs: dict = field(default_factory=dict)
    timesteps_derivable: bool = True
    sampler: str = "lcm"
    step_counts: list[int] | None = None
    recipes: dict[int, StepRecipe] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    call_extra: dict = field(default_factory=dict)

    def allowed_steps(self) -> list[int] | None:
        if self.step_counts is None:
            return None
        return sorted({self.num_inference_steps, *self.step_counts, *self.recipes})

    def for_steps(self, steps: int | None = None) -> StepRecipe:
        """What sampling at ``steps`` means for this export: None is its default call (the exported pipeline with its
        saved scheduler); a count with a recipe of its own gets that; another allowed count runs the saved
        scheduler at that count. A ValueError names the counts it supports otherwise."""
        n, extra = self.num_inference_steps, dict(self.call_extra)
        if steps is None or (steps == n and steps not in self.recipes):
            timesteps = None if self.timesteps_derivable else list(self.timesteps)
            return StepRecipe(n, self.guidance_scale, timesteps=timesteps, call_extra=extra)
        if steps in self.recipes:
            r = self.recipes[steps]
            return StepRecipe(**{**r.__dict__, "call_extra": {**extra, **r.call_extra}})
        allowed = self.allowed_steps()
        if steps >= 1 and (allowed is None or steps in allowed):
            return StepRecipe(steps, self.guidance_scale, call_extra=extra)
        raise ValueError(
            f"this {self.method} export was trained for {n} step(s) at timesteps {self.timesteps}; it samples at "
            f"{allowed} step(s) (see {RECIPE_FILE}), not {steps}"
        )

    def cfg_warning(self, guidance_scale: float | None) -> str | None:
        """The warning for a call at ``guidance_scale`` that runs classifier-free guidance (a second UNet pass per
        step) on a student whose own call does not: its teacher's guidance is distilled in. None otherwise."""
        if guidance_scale is None or guidance_scale <= 1 or self.guidance_scale > 1:
            return None
        return (
            f"guidance_scale={guidance_scale:g} runs classifier-free guidance (two UNet passes per step) on a "
            f"{self.method} student trained without it ({RECIPE_FILE}: guidance_scale {self.guidance_scale:g}); "
            "its images are usually worse, not better"
        )

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "timesteps": list(self.timesteps),
            "timesteps_derivable": self.timesteps_derivable,
            "scheduler": self.scheduler,
            "scheduler_kwargs": self.scheduler_kwargs,
            "sampler": self.sampler,
            "step_counts": self.allowed_steps(),
            "recipes": {str(k): r.to_json() for k, r in sorted(self.recipes.items())},
            **self.extra,
            **self.call_extra,
            "call_extra": sorted(self.call_extra),
        }

    @classmethod
    def from_json(cls, data: dict) -> Recipe:
        known = {k for k in cls.__dataclass_fields__ if k not in ("recipes", "extra", "call_extra")}
        return cls(
            **{k: data[k] for k in known if k in data},
            recipes={int(k): StepRecipe.from_json(v) for k, v in (data.get("recipes") or {}).items()},
            call_extra={k: data[k] for k in data.get("call_extra") or []},
        )


def read_recipe(folder: str | Path) -> dict:
    """``fastdiff.json`` of an export folder, as a dict (``Recipe.from_json`` reads its sampling part)."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fastdiff export: {RECIPE_FILE} is missing")
    return json.loads(path.read_text())


def load_recipe(folder: str | Path) -> Recipe:
    return Recipe.from_json(read_recipe(folder))


def teacher_folder(name: str | Path) -> Path:
    """The teacher folder fastdiff.json names: an absolute path, a path relative to the working directory, or (as
    the bundled recipes write it, e.g. ``assets/teachers/digits-sdxl``) one inside fastdiff's own assets."""
    from .paths import ASSETS

    path = Path(name)
    candidates = [path, ASSETS.parent / path]
    if path.parts and path.parts[0] == "assets":
        candidates.append(ASSETS.joinpath(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the teacher {str(name)!r} named by {RECIPE_FILE} is not a folder here")


def pipeline_dir(folder: str | Path) -> Path:
    """The exported pipeline of an export folder: its ``pipeline/`` (the default layout), or the folder itself when
    ``model_index.json`` sits at its root (the hub layout, ``fastdiff export --hub-layout``)."""
    folder = Path(folder)
    if not (folder / "pipeline").is_dir() and (folder / "model_index.json").is_file():
        return folder
    return folder / "pipeline"


def step_sources(folder: str | Path, step: StepRecipe, data: dict | None = None) -> tuple[Path, Path | None]:
    """(pipeline folder, LoRA folder or None) that serve ``step`` of the export ``folder``: its ``pipeline/``, or
    the teacher named by ``data`` (default: the export's fastdiff.json) and the step's LoRA, inside the export."""
    folder = Path(folder)
    if step.lora is None:
        return pipeline_dir(folder), None
    lora = folder / step.lora
    if not lora.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder}: {RECIPE_FILE} points a LoRA outside the export ({step.lora})")
    data = read_recipe(folder) if data is None else data
    return export_teacher(data), lora


def export_teacher(data: dict) -> Path:
    """The teacher folder of an export's fastdiff.json: its resolved ``teacher_path`` where that is a folder here,
    else ``teacher`` as given (``teacher_folder``)."""
    resolved = data.get("teacher_path")
    if resolved and Path(resolved).is_dir():
        return Path(resolved)
    return teacher_folder(data["teacher"])


def load_lora_pipeline(pipeline_folder: str | Path, lora: str | Path, lora_scale: float = 1.0, **kwargs):
    """A pipeline folder with a LoRA folder fused in at ``lora_scale`` through diffusers' own loader (as export
    writes ``pipeline/``). A LoRA folder that records its base (an export's) must go on that base: a ValueError
    otherwise (``check_lora_base``)."""
    pipe = load_pipeline(pipeline_folder, **kwargs)
    check_lora_folder(pipe.unet, lora)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return pipe


def check_lora_folder(unet, lora: str | Path) -> None:
    """``check_lora_base`` for a LoRA folder (or a file in one) with the base its ``fastdiff_lora.json`` records;
    nothing for a LoRA without one."""
    from .models.lora import LORA_INFO_FILE, check_lora_base

    lora = Path(lora)
    info = (lora if lora.is_dir() else lora.parent) / LORA_INFO_FILE
    if info.is_file():
        check_lora_base(unet, json.loads(info.read_text()), str(lora))


def load_step_pipeline(folder: str | Path, step: StepRecipe, data: dict | None = None, **kwargs):
    """The pipeline that serves ``step`` of the export ``folder``: its ``pipeline/`` as it is, or the teacher with
    the step's LoRA fused at fastdiff.json's ``lora_scale``. Its scheduler is as loaded (``apply_scheduler``)."""
    data = read_recipe(folder) if data is None and step.lora is not None else data
    pipeline, lora = step_sources(folder, step, data)
    if lora is None:
        return load_pipeline(pipeline, **kwargs)
    return load_lora_pipeline(pipeline, lora, data.get("lora_scale") or 1.0, **kwargs)


def apply_scheduler(pipe, step: StepRecipe) -> None:
    """Give ``pipe`` the scheduler ``step`` names (from the pipeline's own scheduler config); none: leave it."""
    if step.scheduler is not None:
        pipe.scheduler = make_scheduler(pipe.scheduler.config, step.scheduler, step.scheduler_kwargs)


def load_pipeline(folder: str | Path, **kwargs):
    """A saved pipeline folder: a standard diffusers pipeline, or one of fastdiff's custom pipelines (an export
    whose model_index.json names a file of ``pipelines/``), loaded with fastdiff's own copy of that class so that
    no code from the folder runs."""
    from diffusers import DiffusionPipeline

    from .teacher import check_pipeline_folder

    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if isinstance(name, list):
        from .paths import pipeline_module

        try:
            module = pipeline_module(name[0])
        except ImportError:
            module = None
        if getattr(module, name[1], None) is None:
            raise ValueError(f"{folder} needs the pipeline {name[1]} from {name[0]}.py, unknown to fastdiff")
        return getattr(module, name[1]).from_pretrained(folder, **kwargs)
    check_pipeline_folder(folder)
    return DiffusionPipeline.from_pretrained(folder, **kwargs)
