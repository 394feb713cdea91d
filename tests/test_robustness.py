"""Issue 20, training side: everything a checkpoint holds resumes exactly (EMA included), numbers a run cannot use
are refused at load, a damaged newest checkpoint is passed over, and data errors are one line."""

import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fastdiff.config import ConfigError, load_config
from fastdiff.run import main, train
from fastdiff.trainer import find_checkpoint, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"


def _args(tiny_teachers, out: Path, *extra: str) -> list[str]:
    return [
        f"teacher={tiny_teachers['sdxl']}", f"output_dir={out}", "export=false", "checkpointing_steps=3",
        "validation_steps=100", "dmd2.ema_decay=0.9", "dmd2.dfake_gen_update_ratio=2", *extra,
    ]  # fmt: skip


def test_a_resumed_run_equals_the_uninterrupted_one_in_every_saved_tensor(
    tiny_teachers, tmp_path, monkeypatch
):
    """Stopped at a checkpoint (as a kill -9 after it leaves it) and resumed: every tensor of the final checkpoint,
    EMA weights included (their warm-up counter is saved), is bit-identical to an uninterrupted run's."""
    monkeypatch.chdir(REPO)
    train(load_config(TINY_RECIPE, _args(tiny_teachers, tmp_path / "a", "max_steps=6")))
    train(load_config(TINY_RECIPE, _args(tiny_teachers, tmp_path / "b", "max_steps=3")))
    train(
        load_config(
            TINY_RECIPE, _args(tiny_teachers, tmp_path / "b", "max_steps=6", "resume_from_checkpoint=latest")
        )
    )
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a/checkpoints/checkpoint-6" / name))
        b = load_file(str(tmp_path / "b/checkpoints/checkpoint-6" / name))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    state = json.loads((tmp_path / "b/checkpoints/checkpoint-6/trainer_state.json").read_text())
    assert state["ema_steps"] == [3, None]  # the generator updates every 2nd step; the critic keeps no EMA


@pytest.mark.parametrize(
    "override, key",
    [
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("checkpointing_steps=0", "checkpointing_steps"),
        ("validation_steps=0", "validation_steps"),
        ("dmd2.dfake_gen_update_ratio=0", "dmd2.dfake_gen_update_ratio"),
        ("max_steps=0", "max_steps"),
        ("max_steps=-5", "max_steps"),
        ("train_batch_size=0", "train_batch_size"),
        ("dmd2.generator_lr=0", "dmd2.generator_lr"),
        ("dmd2.optim.warmup_steps=-1", "dmd2.optim.warmup_steps"),
        ("lora_scale=nan", "lora_scale"),
        ("dmd2.guidance_scale=inf", "dmd2.guidance_scale"),
    ],
)
def test_numbers_a_run_cannot_use_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(TINY_RECIPE, ["teacher=x", override])
    load_config(TINY_RECIPE, ["teacher=x", "dmd2.min_step=0"])  # a timestep may be 0


def test_a_damaged_newest_checkpoint_is_passed_over(tiny_teachers, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    train(load_config(TINY_RECIPE, _args(tiny_teachers, out, "max_steps=6")))
    newest = out / "checkpoints/checkpoint-6"
    assert json.loads((newest / "manifest.json").read_text())["files"]["trainable.safetensors"] > 0
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    assert "trainable.safetensors has 1000 bytes" in verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        assert find_checkpoint(out, "latest") == out / "checkpoints/checkpoint-3"
    assert "checkpoint-6 is damaged" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-6 is damaged"):
        find_checkpoint(out, str(newest))
    train(load_config(TINY_RECIPE, _args(tiny_teachers, out, "max_steps=6", "resume_from_checkpoint=latest")))
    assert verify_checkpoint(newest) is None  # step 6 made again from step 3


def test_data_errors_are_one_line_naming_the_file(tiny_teachers, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red square\n" + b"caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(TINY_RECIPE), f"teacher={tiny_teachers['sdxl']}", f"prompts={prompts}",
              f"output_dir={tmp_path / 'out'}", "max_steps=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert str(prompts) in err[0] and "not UTF-8" in err[0]
    table = tmp_path / "data.csv"
    table.write_text("file,text\nmissing.png,a cat\n")
    with pytest.raises(SystemExit):
        main(["--config", str(TINY_RECIPE), f"teacher={tiny_teachers['sdxl']}", f"dataset={table}",
              "caption_column=label", f"output_dir={tmp_path / 'out2'}", "max_steps=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caption_column" in err[0] and err[0].startswith("fastdiff: error: dataset="), (
        err
    )
