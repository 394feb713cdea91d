"""Training honours accelerate's settings and gives clear errors: mixed precision from ``accelerate launch`` /
``accelerate config``, one-line errors from train/distill.py, trackers that are installed, ``--print-config``,
``attention=xformers``; and a run's log is fastdiff's own lines."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

import fastdiff.trainer
from fastdiff.config import (
    ConfigError,
    TrainConfig,
    describe,
    field_comments,
    load_config,
    resolve_mixed_precision,
    to_dict,
)
from fastdiff.run import check_attention, log_validation_images, main, use_attention
from fastdiff.trainer import trackers

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"


FIND_SPEC = importlib.util.find_spec


def _missing(*names):
    """``importlib.util.find_spec`` as if the packages ``names`` were not installed."""
    return lambda name, *a: None if name in names else FIND_SPEC(name, *a)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastdiff: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


# --- mixed precision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, env, expected",
    [
        (None, None, "no"),  # nothing asked anywhere
        (None, "bf16", "bf16"),  # accelerate launch --mixed_precision bf16 / accelerate config
        ("bf16", None, "bf16"),  # the recipe's
        ("bf16", "no", "bf16"),  # `accelerate launch` sets "no" when nothing was asked: not a request
        ("fp16", "fp16", "fp16"),
    ],
)
def test_mixed_precision_resolution(monkeypatch, config, env, expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if env is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert resolve_mixed_precision(config) == expected


def test_mixed_precision_defaults_to_accelerates():
    assert TrainConfig().mixed_precision is None


def test_mixed_precision_conflict_names_both_values_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text("teacher: /x\nmixed_precision: fp16\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    msg = str(info.value)
    assert "mixed_precision=fp16" in msg and str(recipe) in msg
    assert "ACCELERATE_MIXED_PRECISION=bf16" in msg and "accelerate launch --mixed_precision" in msg
    with pytest.raises(ConfigError, match="mixed_precision=no in command-line overrides"):
        load_config(recipe, ["mixed_precision=no"])  # the override is the value the run would use
    assert load_config(recipe, ["mixed_precision=null"]).mixed_precision == "bf16"  # null: accelerate's


def test_unsupported_precisions_are_config_errors(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8"):
        resolve_mixed_precision(None)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ConfigError, match="mixed_precision=fp32 in x.yaml"):
        resolve_mixed_precision("fp32", "x.yaml")


def test_accelerate_bf16_is_the_runs_precision_and_is_recorded(tiny_teachers, tmp_path, monkeypatch, caplog):
    """``accelerate launch --mixed_precision bf16`` with a recipe that does not set it: the run is bf16, and so is
    the config its checkpoint records. Its log has one line per checkpoint and none of accelerate's INFO."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    caplog.set_level(logging.INFO)  # the root logger at INFO, as the run's log set-up used to leave it
    assert "mixed_precision" not in yaml.safe_load(TINY_RECIPE.read_text())
    made = []
    make_accelerator = fastdiff.trainer.make_accelerator
    monkeypatch.setattr(
        fastdiff.trainer, "make_accelerator", lambda cfg: made.append(make_accelerator(cfg)) or made[-1]
    )
    out = tmp_path / "out"
    main(
        [
            "--config", str(TINY_RECIPE), f"teacher={tiny_teachers['sdxl']}", f"output_dir={out}",
            "max_steps=2", "checkpointing_steps=1", "validation_steps=2", "num_validation_images=1", "export=false",
        ]
    )  # fmt: skip
    assert [acc.mixed_precision for acc in made] == ["bf16"]
    state = json.loads((out / "checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["config"]["mixed_precision"] == "bf16"
    assert caplog.text.count("saved checkpoint") == 2
    assert "Saving current state" not in caplog.text  # accelerate's six INFO lines per checkpoint


# --- train/distill.py errors ------------------------------------------------------------------------------------
def test_distill_unknown_key_is_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("teacher: /x\ndmd2:\n  guidance_scal: 3.0\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(recipe)])
    assert info.value.code == 2
    err = _error_line(capsys)
    assert "dmd2.guidance_scal" in err and str(recipe) in err


def test_distill_missing_teacher_folder_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-teacher"
    with pytest.raises(SystemExit) as info:
        main(["--config", str(TINY_RECIPE), f"teacher={missing}", f"output_dir={tmp_path / 'out'}"])
    assert info.value.code == 2
    assert str(missing) in _error_line(capsys)


# --- trackers ---------------------------------------------------------------------------------------------------
def test_missing_tracker_package_is_an_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("wandb"))
    with pytest.raises(ConfigError, match="report_to=wandb needs the wandb package.*pip install wandb"):
        trackers("wandb")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(TINY_RECIPE), "teacher=/x", f"output_dir={tmp_path}", "report_to=wandb"])
    assert info.value.code == 2
    assert "wandb" in _error_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_tracker_names(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("wandb", "tensorboard", "tensorboardX"))
    assert trackers("none") == []
    with pytest.raises(ConfigError, match="report_to=all: no tracker is installed"):
        trackers("all")
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        trackers("mlflow")
    monkeypatch.setattr(importlib.util, "find_spec", _missing("wandb", "tensorboardX"))
    assert trackers("all") == ["tensorboard"]  # the installed ones
    assert trackers("tensorboard") == ["tensorboard"]
    with pytest.raises(ConfigError, match="needs the wandb package"):
        trackers("tensorboard,wandb")


class _Writer:
    def __init__(self):
        self.calls = []

    def add_images(self, tag, images, step, dataformats):
        self.calls.append((tag, images.shape, step, dataformats))


class _Tracker:
    def __init__(self, name):
        self.name, self.writer, self.images = name, _Writer(), []

    def log_images(self, values, step):
        self.images.append((values, step))


def test_validation_images_go_to_tensorboard_and_wandb():
    class Accelerator:
        trackers = [_Tracker("tensorboard"), _Tracker("wandb")]

    images = torch.rand(3, 3, 8, 6)
    images[0, :, 0, 0] = torch.tensor([0.0, 0.5, 1.0])
    log_validation_images(Accelerator, images, 7)
    tensorboard, wandb = Accelerator.trackers
    assert tensorboard.writer.calls == [("validation", (3, 3, 8, 6), 7, "NCHW")]
    ((values, step),) = wandb.images
    arrays = values["validation"]
    assert step == 7 and len(arrays) == 3
    assert arrays[0].shape == (8, 6, 3) and arrays[0].dtype.name == "uint8"  # HWC bytes: wandb.Image's input
    assert arrays[0][0, 0].tolist() == [0, 128, 255]
    assert not wandb.writer.calls and not tensorboard.images


# --- --print-config ---------------------------------------------------------------------------------------------
def test_print_config_lists_every_key_with_value_default_and_meaning(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    main(["--config", str(TINY_RECIPE), "--print-config", "max_steps=7", f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "max_steps: 7  # default 1000" in lines  # override, then the dataclass default
    assert (
        "mixed_precision: 'no'  # default null; no | fp16 | bf16 | null (accelerate's: ACCELERATE_MIXED_PRECISION)"
        in lines
    )
    assert "  guidance_scale: 3.0  # default 8.0; CFG w of the real score (SDXL 8, SD1.5 1.75)" in lines
    optim = "    warmup_steps: 0  # default 500; linear warm-up, in this group's updates"  # dmd2.optim.warmup_steps
    assert optim in lines
    assert "seed: 0  # default 0" in lines  # a field without a comment: value and default only
    # every key with its current value: the printout reads back as the run's config (teacher not needed)
    cfg = load_config(TINY_RECIPE, ["max_steps=7", f"output_dir={tmp_path}"], require_teacher=False)
    assert yaml.safe_load(out) == to_dict(cfg)
    assert not list(tmp_path.iterdir())  # nothing was trained


RECIPES = sorted(p for p in (REPO / "assets/configs").glob("*.yaml") if not p.name.startswith("teacher_"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_printed_config_of_every_recipe_reads_back_as_its_config(recipe, monkeypatch):
    """Every key, nested sections (msd.dmd2.optim) included, is printed with its current value."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = load_config(recipe, require_teacher=False)
    assert yaml.safe_load(describe(cfg)) == to_dict(cfg)


def test_field_comments_of_multi_line_fields():
    comments = field_comments(TrainConfig)
    # the field's line is `cpu_threads: int | None = (`, its comment on the next one
    assert comments["cpu_threads"].startswith("CPU torch threads per process")
    assert "seed" not in comments  # no comment: no meaning


# --- attention --------------------------------------------------------------------------------------------------
def test_xformers_needs_a_gpu_and_the_package(monkeypatch):
    check_attention("sdpa", torch.device("cpu"))
    with pytest.raises(ConfigError, match="attention=xformers needs a CUDA GPU.*on cpu"):
        check_attention("xformers", torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", _missing("xformers"))
    with pytest.raises(ConfigError, match=r"pip install 'fastdiff\[xformers\]'"):
        check_attention("xformers", torch.device("cuda"))  # a GPU, but no xformers
    with pytest.raises(ConfigError, match="attention=flash is not one of sdpa, xformers"):
        check_attention("flash", torch.device("cpu"))


def test_xformers_on_cpu_stops_distill_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", str(TINY_RECIPE), "teacher=/x", f"output_dir={tmp_path}", "attention=xformers"])
    assert info.value.code == 2
    assert "attention=xformers needs a CUDA GPU" in _error_line(capsys)


def test_xformers_is_switched_on_in_every_unet_once(tiny_teachers, monkeypatch):
    from diffusers import UNet2DConditionModel

    switched = []
    monkeypatch.setattr(
        UNet2DConditionModel, "enable_xformers_memory_efficient_attention", lambda self: switched.append(self)
    )
    unet = UNet2DConditionModel.from_pretrained(tiny_teachers["sd15"], subfolder="unet")
    other = UNet2DConditionModel.from_config(unet.config)
    holder = torch.nn.ModuleDict(
        {"shared": unet, "again": unet, "copy": other, "head": torch.nn.Linear(2, 2)}
    )
    assert use_attention("sdpa", [holder]) == 0 and switched == []
    assert use_attention("xformers", [holder, unet]) == 2
    assert sorted(map(id, switched)) == sorted([id(unet), id(other)])


# --- library output ---------------------------------------------------------------------------------------------
def test_quiet_libraries_drops_notices_and_bars_only_inside_the_block():
    import diffusers.utils.logging as diffusers_logging

    from fastdiff.logs import NOISE, quiet_libraries

    handler = logging.getLogger("diffusers").handlers[0]
    log = logging.getLogger("diffusers.models.modeling_utils")
    notice = log.makeRecord(
        log.name,
        logging.WARNING,
        "",
        0,
        "There are modules in X that should be kept in float32: []. Casting",
        None,
        None,
    )
    useful = log.makeRecord(
        log.name,
        logging.WARNING,
        "",
        0,
        "There are modules in X that should be kept in float32: ['a']",
        None,
        None,
    )
    assert diffusers_logging.is_progress_bar_enabled()
    with quiet_libraries():
        with quiet_libraries():  # nested: the outer block's filter stays
            pass
        assert not handler.filter(notice) and handler.filter(useful)
        assert not diffusers_logging.is_progress_bar_enabled()
    assert handler.filter(notice) and diffusers_logging.is_progress_bar_enabled()
    assert NOISE.search("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")


def test_an_accelerate_config_file_with_bf16_gives_a_bf16_run(tiny_teachers, tmp_path):
    """``accelerate launch --config_file`` (what ``accelerate config`` writes) asking for bf16, a recipe that does
    not set mixed_precision: the run's checkpoint records bf16."""
    import subprocess

    from launching import launch_command, launch_env

    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "NO",
                "mixed_precision": "bf16",
                "num_machines": 1,
                "num_processes": 1,
                "use_cpu": True,
                "dynamo_config": {},
            }
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [*launch_command(config_file=accelerate_config), str(REPO / "train/distill.py"), "--config",
         str(TINY_RECIPE), f"teacher={tiny_teachers['sdxl']}", f"output_dir={out}", "max_steps=1",
         "checkpointing_steps=1", "validation_steps=100", "export=false"],
        cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoints/checkpoint-1/trainer_state.json").read_text())
    assert state["config"]["mixed_precision"] == "bf16"


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "fsdp"])
def test_the_shipped_accelerate_config_files_load_in_accelerate(name):
    """assets/accelerate/*.yaml are accelerate config files (what `accelerate launch --config_file` reads)."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "assets/accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "bf16"
    assert (config.num_processes > 1) == (name != "single_gpu")
