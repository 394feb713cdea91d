"""``fastdiff`` command line: tiny pipelines plain diffusers loads, and clear errors with exit code 2."""

import json

import pytest

from fastdiff.cli import main


def test_tiny_sd15_loads_in_plain_diffusers(tmp_path, capsys):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out = tmp_path / "tiny-sd15"
    main(["tiny", "--family", "sd15", "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert list(out.rglob("*.safetensors"))

    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.tokenizer) == 514
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 32
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_tiny_prediction_type(tmp_path):
    out = tmp_path / "tiny-v"
    main(["tiny", "--family", "sd15", "--out", str(out), "--prediction-type", "v_prediction"])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_train_unknown_config_key_exits_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("teacher: /x\nmax_steps: 2\ndmd2:\n  guidance_scal: 3.0\n")
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "dmd2.guidance_scal" in err
    assert str(recipe) in err
    assert "guidance_scale" in err  # lists the allowed keys


def test_train_unknown_override_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "teacher=/x", "max_stepz=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and "command-line overrides" in err


def test_generate_without_recipe_exits_2(tmp_path, capsys):
    folder = tmp_path / "not-an-export"
    folder.mkdir()
    with pytest.raises(SystemExit) as info:
        main(["generate", str(folder), "a photo of a cat"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "fastdiff.json" in err and str(folder) in err


def test_export_without_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "trainer_state.json" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_demo_threads_reach_the_recipe(monkeypatch, tmp_path):
    import fastdiff.demo

    seen = {}
    monkeypatch.setattr(
        fastdiff.demo, "demo", lambda out, method, n, overrides: seen.update(overrides=overrides)
    )
    main(["demo", "--output-dir", str(tmp_path), "--threads", "1", "max_steps=2"])
    assert seen["overrides"] == [
        "cpu_threads=1",
        "max_steps=2",
    ]  # the digits recipes' cpu_threads: 0 would win
    main(["demo", "--output-dir", str(tmp_path), "max_steps=2"])
    assert seen["overrides"] == ["max_steps=2"]  # default: the recipe's own setting (all cores)


def test_generate_refuses_a_step_count_the_export_does_not_sample_at(tmp_path, capsys):
    from fastdiff.recipe import RECIPE_FILE, Recipe

    recipe = Recipe("dmd2", 4, 0.0, [999, 749, 499, 249], "LCMScheduler", {"original_inference_steps": 4})
    recipe.step_counts = [1, 2, 3, 4]
    (tmp_path / RECIPE_FILE).write_text(json.dumps(recipe.to_json()))
    with pytest.raises(SystemExit) as info:  # refused before any pipeline is loaded
        main(["generate", str(tmp_path), "a photo of a cat", "--steps", "5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "[1, 2, 3, 4] step(s)" in err and "not 5" in err


def test_prepare_of_a_method_without_a_stage(tiny_teachers, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    main(["prepare", f"teacher={tiny_teachers['sd15']}", f"prompts={prompts}", f"output_dir={tmp_path}"])
    assert "this method has no stage before training" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["prepare", "teacher=/x", "method=nosuch"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'nosuch'" in err and "dmd2" in err and "agd" in err


def test_help_summary_lists_every_command():
    import argparse

    from fastdiff.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub.choices) >= 10
    for name in sub.choices:
        assert name in parser.description, name


def test_generate_options_are_explained(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--out OUT image file (default: sample.png)" in text
    assert "--seed SEED seed of the initial noise (default: 0)" in text
    assert "--num-images NUM_IMAGES images of the prompt (default: 1)" in text


def test_demo_method_lists_the_digits_recipes(capsys):
    from fastdiff.paths import asset

    recipes = sorted(p.stem.removeprefix("digits_") for p in asset("configs").glob("digits_*.yaml"))
    assert "dmd2" in recipes and "lcm" in recipes
    with pytest.raises(SystemExit) as info:
        main(["demo", "--method", "nosuch"])
    assert info.value.code == 2
    assert f"choose from {', '.join(repr(r) for r in recipes)}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "{" + ",".join(recipes) + "}" in capsys.readouterr().out


def test_train_print_config_and_its_help(capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    main(["train", "--print-config", "method=sid", "max_steps=3"])  # no teacher needed to print
    lines = capsys.readouterr().out.splitlines()
    assert "max_steps: 3  # default 1000" in lines and "sid:" in lines
    assert "teacher: null  # default null; local diffusers pipeline folder" in lines
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--print-config" in capsys.readouterr().out
    from fastdiff.run import main as distill

    with pytest.raises(SystemExit):
        distill(["--help"])  # train/distill.py's
    assert "--print-config" in capsys.readouterr().out
