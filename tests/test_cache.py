"""``fastdiff cache`` and ``cache=DIR``: the same batches bit for bit as from raw data, a resumable cache, a cache of
another run refused in one line, and a short training run on a cache."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from launching import launch_command, launch_env
from PIL import Image
from safetensors.torch import load_file

from fastdiff.cache import CachedData, CacheError, write_cache
from fastdiff.cli import main as cli
from fastdiff.config import load_config
from fastdiff.data import ImageCaptionDataset
from fastdiff.methods.shards import MANIFEST
from fastdiff.run import make_batch_fn, run_context, train
from fastdiff.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"
PROMPTS = [
    "a red square",
    "a blue circle",
    "a green cat",
    "a photo of a yellow dog",
    "a watercolor landscape",
]
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "grey": (90,) * 3,
}


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    """A prompt file and a csv image dataset (images of several sizes, centre-cropped)."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (40 + 8 * i, 32), rgb)
        image.putpixel((i, i), (255, 255, 255))
        image.save(tmp_path / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a {name} square"})
    with (tmp_path / "data.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return {"prompts": tmp_path / "prompts.txt", "dataset": tmp_path / "data.csv"}


def config(teacher: str, *overrides: str):
    return load_config(TINY_RECIPE, [f"teacher={teacher}", "gradient_accumulation_steps=2", *overrides])


def batch_fn(cfg, teacher_path: str):
    """A run's batch_fn on a freshly loaded teacher (nothing encoded yet)."""
    ctx = run_context(cfg, Teacher(teacher_path))
    return make_batch_fn(cfg, ctx.teacher, ctx.resolution, ctx.prompts, ctx.dataset, 0, 1)


def assert_same_batches(raw, cached, steps: int = 3) -> None:
    for step in range(steps):
        for micro in range(2):
            a, b = (
                fn(step, micro, torch.Generator().manual_seed(100 * step + micro)) for fn in (raw, cached)
            )
            assert a["indices"] == b["indices"] and a["prompts"] == b["prompts"]
            for field in ("prompt_embeds", "pooled", "time_ids"):
                assert torch.equal(getattr(a["cond"], field), getattr(b["cond"], field)), (step, micro, field)
            assert (a["real"] is None) == (b["real"] is None)
            if a["real"] is not None:
                assert torch.equal(a["real"], b["real"])


def shards(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}/{k}": v for p in sorted(folder.glob("shard-*")) for k, v in load_file(p).items()}


def test_prompt_cache_gives_the_same_batches_and_moves_the_text_encoders(
    tiny_teachers, tmp_path, data, capsys
):
    teacher = tiny_teachers["sdxl"]
    out = tmp_path / "cache"
    cli(
        [
            "cache",
            "--config",
            str(TINY_RECIPE),
            f"teacher={teacher}",
            f"prompts={data['prompts']}",
            "--out",
            str(out),
        ]
    )
    assert "complete" in capsys.readouterr().out
    plan = json.loads((out / MANIFEST).read_text())["plan"]
    assert plan["num_items"] == len(PROMPTS) and plan["resolution"] == 32 and plan["family"] == "sdxl"
    assert set(plan["shapes"]) == {"prompt_embeds", "pooled", "time_ids"}  # no images: no latents
    raw = batch_fn(config(teacher, f"prompts={data['prompts']}"), teacher)
    cfg = config(teacher, f"prompts={data['prompts']}", f"cache={out}")
    ctx = run_context(cfg, Teacher(teacher))
    cached = make_batch_fn(cfg, ctx.teacher, ctx.resolution, ctx.prompts, ctx.dataset, 0, 1)
    assert_same_batches(raw, cached)
    encoders = [ctx.teacher.pipeline.text_encoder, ctx.teacher.pipeline.text_encoder_2]
    assert all(e._forward_pre_hooks and e._forward_hooks for e in encoders)  # run on the CPU from now on
    reference = Teacher(teacher).encode(["a prompt met after the move"])
    after = ctx.teacher.encode(["a prompt met after the move"])  # through the hooks
    assert torch.equal(reference.prompt_embeds, after.prompt_embeds) and torch.equal(
        reference.pooled, after.pooled
    )


def test_two_ranks_split_the_shards_and_make_the_same_cache(tiny_teachers, tmp_path, data):
    teacher, one, two = tiny_teachers["sdxl"], tmp_path / "one", tmp_path / "two"
    args = ["cache", "--config", str(TINY_RECIPE), f"teacher={teacher}", f"prompts={data['prompts']}"]
    cli([*args, "--out", str(one), "--shard-size", "2"])
    proc = subprocess.run(
        [*launch_command(2), "-m", "fastdiff.cli", *args, "--out", str(two), "--shard-size", "2"],
        env=launch_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "complete (2 shards made here, 0 kept)" in proc.stdout  # rank 0: shards 0 and 2, rank 1: shard 1
    a, b = shards(one), shards(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_cache_resumes_after_an_interruption_and_gives_the_same_batches(tiny_teachers, tmp_path, data):
    teacher = tiny_teachers["sdxl"]
    overrides = [f"dataset={data['dataset']}", "prompts=null"]
    ctx = run_context(config(teacher, *overrides), Teacher(teacher))
    whole, part = tmp_path / "whole", tmp_path / "part"
    write_cache(whole, ctx, shard_size=2)
    with pytest.raises(CacheError, match="incomplete"):  # interrupted after its first shard
        write_cache(part, ctx, shard_size=2, max_shards=1)
    with pytest.raises(CacheError, match=rf"^cache={part}: .* is incomplete: run `fastdiff cache"):
        CachedData(part, ctx.teacher, ctx.resolution, ctx.run, ctx.prompts, ctx.dataset)
    (part / "shard-00001.safetensors").write_bytes(b"torn")  # a write killed half-way
    report = write_cache(part, ctx, shard_size=2)
    assert report["skipped"] == [0] and report["generated"] == [1, 2]
    a, b = shards(whole), shards(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k.split("/")[1] for k in a} >= {"latent_mean", "latent_std", "prompt_embeds"}
    raw = batch_fn(config(teacher, *overrides), teacher)
    cached = batch_fn(config(teacher, *overrides, f"cache={part}"), teacher)
    assert_same_batches(raw, cached, steps=4)  # 5 images, 4 per step: the epochs wrap around


def test_a_cache_of_another_run_is_a_one_line_error(tiny_teachers, tmp_path, data):
    sdxl, sd15 = tiny_teachers["sdxl"], tiny_teachers["sd15"]
    out = tmp_path / "cache"
    write_cache(out, run_context(config(sdxl, f"prompts={data['prompts']}"), Teacher(sdxl)))
    for teacher, overrides, differs in (
        (sdxl, ["resolution=64"], "latent_shape, resolution"),
        (sd15, [], "encoders"),
        (sdxl, [f"dataset={data['dataset']}", "prompts=null"], "data"),
    ):
        with pytest.raises(CacheError) as e:
            batch_fn(config(teacher, f"prompts={data['prompts']}", f"cache={out}", *overrides), teacher)
        message = str(e.value)
        assert message.startswith(f"cache={out} was made for another run") and differs in message
        assert "\n" not in message
    with pytest.raises(CacheError, match=rf"^cache={tmp_path} has no manifest.json"):
        batch_fn(config(sdxl, f"prompts={data['prompts']}", f"cache={tmp_path}"), sdxl)


def test_random_augmentation_and_unreadable_images_are_refused(tiny_teachers, tmp_path, data):
    teacher = tiny_teachers["sdxl"]
    ctx = run_context(config(teacher, f"dataset={data['dataset']}", "prompts=null"), Teacher(teacher))
    ctx.dataset = ImageCaptionDataset(data["dataset"], 32, random_flip=True)
    with pytest.raises(CacheError, match="flips at random"):
        write_cache(tmp_path / "flip", ctx)
    (data["dataset"].parent / "grey.png").write_bytes(b"not an image")
    ctx.dataset = ImageCaptionDataset(data["dataset"], 32)
    with (
        pytest.raises(CacheError, match=r"dataset item 4 \(grey.png\) is unreadable"),
        pytest.warns(UserWarning),
    ):
        write_cache(tmp_path / "broken", ctx)


def test_training_on_a_cache(tiny_teachers, tmp_path, data, monkeypatch):
    monkeypatch.chdir(REPO)
    teacher = tiny_teachers["sdxl"]
    overrides = [f"dataset={data['dataset']}", "prompts=null"]
    write_cache(tmp_path / "cache", run_context(config(teacher, *overrides), Teacher(teacher)))
    out = tmp_path / "out"
    cfg = config(
        teacher,
        *overrides,
        f"cache={tmp_path / 'cache'}",
        f"output_dir={out}",
        "max_steps=2",
        "checkpointing_steps=2",
        "validation_steps=2",
        "export=false",
    )
    train(cfg)
    state = json.loads((out / "checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["step"] == 2 and state["config"]["cache"] == str(tmp_path / "cache")
    assert "critic/gan_d" in state["last_terms"]  # the cached latents reached the loss
    assert (out / "samples/step-000002.png").is_file()  # validation encoded its prompts and decoded
