"""Config loading: YAML recipes + key=value overrides, checked against the dataclass schema."""

import dataclasses
from pathlib import Path

import pytest

from fastdiff.config import ConfigError, DMD2Config, TrainConfig, from_dict, load_config, to_dict
from fastdiff.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p for p in (REPO / "assets" / "configs").glob("*.yaml") if not p.name.startswith("teacher_")
)  # distillation recipes; teacher_*.yaml: tests/test_digits_teacher.py
TOP_KEYS = sorted(f.name for f in dataclasses.fields(TrainConfig))
DMD2_KEYS = sorted(f.name for f in dataclasses.fields(DMD2Config))


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _assert_lists_keys(message: str, keys: list[str]) -> None:
    assert "allowed keys" in message
    for key in keys:
        assert key in message, f"allowed key {key!r} missing from: {message}"


# --- YAML + overrides -------------------------------------------------------------------------------------------
def test_yaml_values_and_defaults(tmp_path):
    path = _write(
        tmp_path,
        "teacher: /models/sdxl\nmax_steps: 20\ndmd2:\n  guidance_scale: 3.0\n  student_timesteps: [399]\n",
    )
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.teacher == "/models/sdxl"
    assert cfg.max_steps == 20
    assert cfg.dmd2.guidance_scale == 3.0
    assert cfg.dmd2.student_timesteps == [399]
    # untouched keys keep their defaults, in the section too
    assert cfg.train_batch_size == TrainConfig().train_batch_size
    assert cfg.dmd2.generator_lr == DMD2Config().generator_lr


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        None,
        [
            "teacher=/x",
            "max_steps=7",
            "lora_scale=0.5",
            "checkpoints_total_limit=null",
            "resolution=64",
            "gradient_checkpointing=true",
            "validation_prompts=[a cat, a dog]",
            "dmd2.generator_lr=1e-5",
            "dmd2.student_timesteps=[999, 499]",
            "dmd2.betas=[0.0, 0.99]",
            "dmd2.ema_decay=0.999",
        ],
    )
    assert cfg.max_steps == 7 and type(cfg.max_steps) is int
    assert cfg.lora_scale == 0.5
    assert cfg.checkpoints_total_limit is None
    assert cfg.resolution == 64
    assert cfg.gradient_checkpointing is True
    assert cfg.validation_prompts == ["a cat", "a dog"]
    assert cfg.dmd2.generator_lr == pytest.approx(1e-5) and type(cfg.dmd2.generator_lr) is float
    assert cfg.dmd2.student_timesteps == [999, 499]
    assert all(type(t) is int for t in cfg.dmd2.student_timesteps)
    assert cfg.dmd2.betas == [0.0, 0.99]
    assert cfg.dmd2.ema_decay == 0.999
    # the rest of the section is untouched by a dotted override
    assert cfg.dmd2.fake_lr == DMD2Config().fake_lr


def test_overrides_win_over_yaml_and_merge_into_sections(tmp_path):
    path = _write(tmp_path, "teacher: /a\nmax_steps: 20\ndmd2:\n  guidance_scale: 3.0\n  lora_rank: 4\n")
    cfg = load_config(path, ["teacher=/b", "dmd2.lora_rank=16"])
    assert cfg.teacher == "/b"
    assert cfg.max_steps == 20
    assert cfg.dmd2.lora_rank == 16
    assert cfg.dmd2.guidance_scale == 3.0  # the YAML's sibling key survives the dotted override


def test_override_value_may_contain_equals_sign():
    assert load_config(None, ["teacher=/models/a=b"]).teacher == "/models/a=b"


# --- errors ------------------------------------------------------------------------------------------------------
def test_unknown_top_level_key_in_yaml(tmp_path):
    path = _write(tmp_path, "teacher: /x\nmax_stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "max_stepz" in msg
    assert str(path) in msg
    _assert_lists_keys(msg, TOP_KEYS)


def test_unknown_dmd2_key_in_yaml(tmp_path):
    path = _write(tmp_path, "teacher: /x\ndmd2:\n  guidance_scale: 2.0\n  generator_lrr: 1.0e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "dmd2.generator_lrr" in msg
    assert str(path) in msg
    _assert_lists_keys(msg, DMD2_KEYS)
    assert "max_steps" not in msg  # lists the keys of the section, not of the top level


def test_unknown_top_level_key_in_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "learning_rate=1e-4"])
    msg = str(info.value)
    assert "learning_rate" in msg
    assert "command-line overrides" in msg
    _assert_lists_keys(msg, TOP_KEYS)


def test_unknown_dmd2_key_in_override(tmp_path):
    path = _write(tmp_path, "teacher: /x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["dmd2.guidance=4"])
    msg = str(info.value)
    assert "dmd2.guidance" in msg
    assert "command-line overrides" in msg
    assert str(path) not in msg  # the file was fine: the error points at the overrides
    _assert_lists_keys(msg, DMD2_KEYS)


def test_unknown_section_in_override():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "dmd3.guidance_scale=4"])
    assert "dmd3" in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_steps=abc", "max_steps"),
        ("max_steps=1.5", "max_steps"),
        ("export=maybe", "export"),
        ("dmd2.lora_rank=big", "lora_rank"),
        ("dmd2.student_timesteps=[999, x]", "student_timesteps"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", override])
    assert key in str(info.value)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = _write(tmp_path, "teacher: /x\ntrain_batch_size: four\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train_batch_size" in str(info.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "max_steps"])
    assert "max_steps" in str(info.value)


@pytest.mark.parametrize("overrides", [[], ["teacher="], ["teacher=null"], ['teacher=""']])
def test_missing_teacher(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert "teacher" in str(info.value)


def test_missing_teacher_in_yaml(tmp_path):
    path = _write(tmp_path, "max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "teacher" in str(info.value)


def test_missing_teacher_says_how_to_set_it():
    with pytest.raises(ConfigError, match="no teacher given"):
        load_config(None, [])


def test_empty_teacher_says_how_to_set_it():
    with pytest.raises(ConfigError, match="no teacher given"):
        load_config(None, ['teacher=""'])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, ["teacher=/x"])
    assert "not found" in str(info.value)
    assert str(missing) in str(info.value)


# --- round trip -------------------------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    cfg = load_config(
        None,
        ["teacher=/x", "max_steps=3", "resolution=64", "dmd2.student_timesteps=[399]", "dmd2.ema_decay=0.9"],
    )
    data = to_dict(cfg)
    assert isinstance(data, dict) and isinstance(data["dmd2"], dict)
    assert data["dmd2"]["student_timesteps"] == [399]
    back = from_dict(data)
    assert isinstance(back, TrainConfig) and isinstance(back.dmd2, DMD2Config)
    assert back == cfg
    assert to_dict(back) == data


def test_from_dict_rejects_unknown_keys():
    data = to_dict(load_config(None, ["teacher=/x"]))
    data["dmd2"]["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert "dmd2.bogus" in str(info.value)


# --- shipped recipes --------------------------------------------------------------------------------------------
def test_there_are_recipes():
    assert RECIPES, "no YAML recipes under assets/configs/"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(recipe):
    cfg = load_config(recipe, ["teacher=/x"])
    assert cfg.teacher == "/x"
    assert cfg.method in METHODS
    assert all(0 <= t < 1000 for t in cfg.dmd2.student_timesteps)


def test_yaml_no_and_off_stay_strings(tmp_path):
    cfg = load_config(None, ["teacher=/x", "mixed_precision=no", "dmd2.gan=off"])
    assert cfg.mixed_precision == "no" and cfg.dmd2.gan == "off"
    path = _write(
        tmp_path, "teacher: /x\nmixed_precision: no\ndmd2:\n  gan: on\n  backward_simulation: false\n"
    )
    cfg = load_config(path)
    assert cfg.mixed_precision == "no" and cfg.dmd2.gan == "on" and cfg.dmd2.backward_simulation is False
