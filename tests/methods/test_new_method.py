"""The method contract: a new method defined entirely in this file (class, config section, registration) trains
through the same entry as ``fastdiff train`` and exports a pipeline that plain diffusers loads, touching no
library file."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastdiff.cli import main
from fastdiff.config import ConfigError, OptimizerConfig, load_config, optim_field, to_dict
from fastdiff.methods import registry, student
from fastdiff.methods.base import Group, Method, optimizer_settings, randn
from fastdiff.recipe import Recipe, derive_scheduler


@dataclass
class ToyConfig:
    """One-step regression onto the teacher's x0 prediction from pure noise (a toy, not a method of the field)."""

    lora_rank: int = 4
    lr: float = 1e-3
    optim: OptimizerConfig = optim_field(max_grad_norm=1.0)


class ToyRegression(Method):
    name = "toy_regression"
    config = ToyConfig

    def __init__(self, generator, teacher, cfg: ToyConfig, sample_shape, params):
        super().__init__()
        self.generator, self.teacher, self.cfg = generator, teacher, cfg
        self.sample_shape, self._params = tuple(sample_shape), params

    @classmethod
    def build(cls, ctx):
        from fastdiff.models.lora import add_adapter, named_adapter_parameters

        unet = ctx.teacher.unet
        add_adapter(unet, "toy", ctx.config.lora_rank, ctx.config.lora_rank)
        generator = ctx.teacher.denoiser(unet, adapter="toy")
        teacher = ctx.teacher.denoiser(unet, adapter=None)
        return cls(generator, teacher, ctx.config, ctx.latent_shape, named_adapter_parameters(unet, "toy"))

    def groups(self):
        return [
            Group("generator", self._params, self.cfg.lr, **optimizer_settings(self.cfg.optim, self.name))
        ]

    def loss(self, group, batch, step, generator):
        cond = batch["cond"]
        z = randn((len(cond), *self.sample_shape), generator, self.generator.alphas_cumprod.device)
        t = torch.full((len(cond),), 999, device=z.device)
        with torch.no_grad():
            target = self.teacher(z, t, cond)
        return {"mse": F.mse_loss(self.generator(z, t, cond).float(), target.float())}

    @torch.no_grad()
    def generate(self, noise, cond, timesteps=None, generator=None):
        g = generator or torch.Generator().manual_seed(0)
        return student.sample(self.generator, noise, cond, [999], g, self.generator.alphas_cumprod)

    def exported_student(self):
        return student.exported(self.generator)

    def recipe(self, scheduler_config):
        name, kwargs, derivable = derive_scheduler(scheduler_config, [999])
        return Recipe(self.name, 1, 0.0, [999], name, kwargs, derivable, "lcm", step_counts=[1])


@pytest.fixture
def toy_method():
    registry.register(ToyRegression)
    yield ToyRegression
    registry._METHODS.pop(ToyRegression.name)


def test_a_method_defined_in_a_test_trains_through_fastdiff_train_and_exports(
    tiny_teachers, tmp_path, toy_method
):
    from diffusers import DiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    overrides = [
        "method=toy_regression",
        f"teacher={tiny_teachers['sdxl']}",
        f"prompts={prompts}",
        f"output_dir={out}",
        "max_steps=4",
        "train_batch_size=2",
        "checkpointing_steps=2",
        "validation_steps=4",
        "num_validation_images=1",
        "validation_prompts=[a red square]",
        "toy_regression.lora_rank=2",
    ]
    main(["train", *overrides])

    saved = json.loads((out / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert saved["method"] == "toy_regression" and saved["config"]["toy_regression"]["lora_rank"] == 2
    recipe = json.loads((out / "fastdiff.json").read_text())
    assert recipe["method"] == "toy_regression" and recipe["lora"] and recipe["step_counts"] == [1]
    assert recipe["check"]["max_abs_diff_latents"] < 1e-3  # the export reproduces the method's own sampler

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    image = pipe(
        "a red square",
        num_inference_steps=recipe["num_inference_steps"],
        guidance_scale=recipe["guidance_scale"],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape[-1] == 3 and torch.isfinite(torch.as_tensor(image)).all()


def test_a_registered_method_gets_its_own_config_section(toy_method):
    cfg = load_config(None, ["teacher=x", "method=toy_regression", "toy_regression.optim.warmup_steps=3"])
    assert isinstance(cfg.section, ToyConfig) and cfg.section.optim.warmup_steps == 3
    assert set(to_dict(cfg)) & set(registry.names()) == {
        "toy_regression"
    }  # only the selected section is saved
    with pytest.raises(ConfigError, match="toy_regression.bogus"):
        load_config(None, ["teacher=x", "method=toy_regression", "toy_regression.bogus=1"])
    with pytest.raises(ConfigError, match="toy_regression"):  # the unknown-method error lists it
        load_config(None, ["teacher=x", "method=nope"])
