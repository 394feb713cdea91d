"""Config loading: YAML recipes + key=value overrides, checked against the dataclass schema."""

import dataclasses
from pathlib import Path

import pytest

from fastdiff.config import ConfigError, OptimizerConfig, TrainConfig, from_dict, load_config, to_dict
from fastdiff.methods import registry
from fastdiff.methods.dmd2 import DMD2Config
from fastdiff.methods.sid import SiDConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p for p in (REPO / "assets" / "configs").glob("*.yaml") if not p.name.startswith("teacher_")
)  # distillation recipes; teacher_*.yaml: tests/test_digits_teacher.py
TOP_KEYS = sorted(
    f.name for f in dataclasses.fields(TrainConfig) if f.name != "section"
)  # `section` holds the method's section: it is read under the method's name, not as a key
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
    assert cfg.section.guidance_scale == 3.0
    assert cfg.section.student_timesteps == [399]
    # untouched keys keep their defaults, in the section too
    assert cfg.train_batch_size == TrainConfig().train_batch_size
    assert cfg.section.generator_lr == DMD2Config().generator_lr


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
            "dmd2.optim.betas=[0.0, 0.99]",
            "dmd2.ema_decay=0.999",
        ],
    )
    assert cfg.max_steps == 7 and type(cfg.max_steps) is int
    assert cfg.lora_scale == 0.5
    assert cfg.checkpoints_total_limit is None
    assert cfg.resolution == 64
    assert cfg.gradient_checkpointing is True
    assert cfg.validation_prompts == ["a cat", "a dog"]
    assert cfg.section.generator_lr == pytest.approx(1e-5) and type(cfg.section.generator_lr) is float
    assert cfg.section.student_timesteps == [999, 499]
    assert all(type(t) is int for t in cfg.section.student_timesteps)
    assert cfg.section.optim.betas == [0.0, 0.99]
    assert cfg.section.ema_decay == 0.999
    # the rest of the section is untouched by a dotted override
    assert cfg.section.fake_lr == DMD2Config().fake_lr


def test_overrides_win_over_yaml_and_merge_into_sections(tmp_path):
    path = _write(tmp_path, "teacher: /a\nmax_steps: 20\ndmd2:\n  guidance_scale: 3.0\n  lora_rank: 4\n")
    cfg = load_config(path, ["teacher=/b", "dmd2.lora_rank=16"])
    assert cfg.teacher == "/b"
    assert cfg.max_steps == 20
    assert cfg.section.lora_rank == 16
    assert cfg.section.guidance_scale == 3.0  # the YAML's sibling key survives the dotted override


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
    assert isinstance(back, TrainConfig) and isinstance(back.section, DMD2Config)
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
    assert cfg.method in registry.names()
    assert isinstance(cfg.section, registry.get(cfg.method).config)
    # the section is the recipe's own method's: its student timesteps (where it has them) are in range
    assert all(0 <= t < 1000 for t in getattr(cfg.section, "student_timesteps", []))


def test_yaml_no_and_off_stay_strings(tmp_path):
    cfg = load_config(None, ["teacher=/x", "mixed_precision=no", "dmd2.gan=off"])
    assert cfg.mixed_precision == "no" and cfg.section.gan == "off"
    path = _write(
        tmp_path, "teacher: /x\nmixed_precision: no\ndmd2:\n  gan: on\n  backward_simulation: false\n"
    )
    cfg = load_config(path)
    assert (
        cfg.mixed_precision == "no" and cfg.section.gan == "on" and cfg.section.backward_simulation is False
    )


# --- method sections and their optim sub-section ----------------------------------------------------------------
def test_optim_override_reaches_the_built_methods_groups(tiny_teachers):
    from fastdiff.methods import build
    from fastdiff.run import run_context
    from fastdiff.teacher import Teacher

    cfg = load_config(
        None,
        [
            f"teacher={tiny_teachers['sdxl']}",
            "dmd2.optim.warmup_steps=3",
            "dmd2.optim.lr_schedule=cosine",
            "dmd2.lora_rank=4",
            "dmd2.lora_alpha=4",
        ],
    )
    assert isinstance(cfg.section.optim, OptimizerConfig)
    assert cfg.section.optim.warmup_steps == 3
    # the rest of the optim sub-section keeps DMD2's own defaults, not OptimizerConfig's
    assert cfg.section.optim.weight_decay == DMD2Config().optim.weight_decay == 0.01
    assert cfg.section.optim.max_grad_norm == DMD2Config().optim.max_grad_norm == 10.0
    method = build(run_context(cfg, Teacher(cfg.teacher), with_data=False))
    groups = method.groups()
    assert [g.name for g in groups] == ["generator", "critic"]
    for g in groups:
        assert g.warmup_steps == 3
        assert g.lr_schedule == "cosine"
        assert g.weight_decay == 0.01 and g.max_grad_norm == 10.0 and g.optimizer == "adamw"
    # learning rates stay in the method's section
    assert [g.lr for g in groups] == [cfg.section.generator_lr, cfg.section.fake_lr]


@pytest.mark.parametrize(
    ("method", "defaults"),
    [
        ("dmd2", dict(weight_decay=0.01, warmup_steps=500, max_grad_norm=10.0)),
        ("sid", dict(betas=[0.0, 0.999])),
        ("tscd", dict(weight_decay=1e-3, warmup_steps=500, max_grad_norm=1.0)),
        ("agd", dict(warmup_steps=500, lr_schedule="cosine", max_grad_norm=1.0)),
    ],
)
def test_each_method_has_its_own_optim_defaults_and_overrides(method, defaults):
    from fastdiff.methods.base import optimizer_settings

    cfg = load_config(None, ["teacher=/x", f"method={method}"])
    assert isinstance(cfg.section, registry.get(method).config)
    expected = dataclasses.asdict(OptimizerConfig(**defaults))
    assert dataclasses.asdict(cfg.section.optim) == expected
    cfg = load_config(
        None, ["teacher=/x", f"method={method}", f"{method}.optim.warmup_steps=3", f"{method}.optim.eps=1e-6"]
    )
    settings = optimizer_settings(cfg.section.optim, method)
    assert settings["warmup_steps"] == 3 and settings["eps"] == 1e-6
    assert settings["betas"] == tuple(defaults.get("betas", [0.9, 0.999]))  # untouched keys keep the defaults


def test_optim_bad_values_name_the_key():
    from fastdiff.methods.base import optimizer_settings

    cfg = load_config(None, ["teacher=/x", "dmd2.optim.lr_schedule=linear"])
    with pytest.raises(
        ValueError, match=r"dmd2\.optim\.lr_schedule must be constant or cosine, got 'linear'"
    ):
        optimizer_settings(cfg.section.optim, "dmd2")
    cfg = load_config(None, ["teacher=/x", "dmd2.optim.optimizer=sgd"])
    with pytest.raises(ValueError, match=r"dmd2\.optim\.optimizer must be adamw or adamw8bit"):
        optimizer_settings(cfg.section.optim, "dmd2")


def test_unknown_optim_key_names_the_dotted_key_and_lists_the_optim_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "dmd2.optim.warmup=3"])
    msg = str(info.value)
    assert "dmd2.optim.warmup" in msg
    _assert_lists_keys(msg, sorted(f.name for f in dataclasses.fields(OptimizerConfig)))


def test_optimizer_keys_moved_out_of_the_method_section():
    for key in ("warmup_steps=0", "lr_schedule=cosine", "betas=[0.0, 0.99]", "max_grad_norm=1.0"):
        with pytest.raises(ConfigError, match=r"dmd2\." + key.split("=")[0]):
            load_config(None, ["teacher=/x", f"dmd2.{key}"])


def test_saved_config_holds_only_the_selected_methods_section():
    for method in registry.names():
        data = to_dict(load_config(None, ["teacher=/x", f"method={method}"]))
        assert data["method"] == method
        assert "section" not in data
        assert [k for k in data if k in registry.names()] == [method]
        section = data[
            method
        ]  # optimizer settings: its own, or those of the method it builds on (msd.dmd2.optim)
        assert isinstance(
            section.get("optim")
            or next(v["optim"] for v in section.values() if isinstance(v, dict) and "optim" in v),
            dict,
        )
        assert from_dict(data) == load_config(None, ["teacher=/x", f"method={method}"])
    data = to_dict(load_config(None, ["teacher=/x", "method=sid", "sid.optim.warmup_steps=7"]))
    assert data["sid"]["optim"]["warmup_steps"] == 7
    assert "dmd2" not in data and "tscd" not in data and "agd" not in data


def test_hand_built_config_saves_its_section_under_the_method_name():
    cfg = TrainConfig(method="sid", teacher="/x")
    cfg.section = SiDConfig(num_steps=4, optim=OptimizerConfig(betas=[0.0, 0.999], warmup_steps=2))
    data = to_dict(cfg)
    assert data["sid"]["num_steps"] == 4 and data["sid"]["optim"]["warmup_steps"] == 2
    assert [k for k in data if k in registry.names()] == ["sid"]
    back = from_dict(data)
    assert isinstance(back.section, SiDConfig) and back == cfg


def test_section_of_another_method_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "sid.num_steps=4"])  # the method is dmd2 (the default)
    msg = str(info.value)
    assert "config section 'sid'" in msg and "belongs to method sid" in msg and "the method is dmd2" in msg
    assert "command-line overrides" in msg
    path = _write(tmp_path, "teacher: /x\nmethod: sid\ndmd2:\n  guidance_scale: 3.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "config section 'dmd2'" in msg and "the method is sid" in msg and str(path) in msg
    # a saved config with a second section is refused too
    data = to_dict(load_config(None, ["teacher=/x"]))
    data["tscd"] = {}
    with pytest.raises(ConfigError, match="config section 'tscd'"):
        from_dict(data)


def test_method_selected_by_override_reads_the_yaml_section_of_that_method(tmp_path):
    path = _write(tmp_path, "teacher: /x\nmethod: dmd2\n")
    cfg = load_config(path, ["method=sid", "sid.num_steps=4"])
    assert cfg.method == "sid" and isinstance(cfg.section, SiDConfig) and cfg.section.num_steps == 4


def test_unknown_method_lists_the_registered_names():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher=/x", "method=dmd3"])
    msg = str(info.value)
    assert "dmd3" in msg
    for name in registry.names():
        assert name in msg
    assert set(registry.names()) >= {"dmd2", "sid", "tscd", "agd"}
