"""Tests for fastdiff.data: prompt files, image-caption folders, resumable batch order."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image, ImageFile

from fastdiff.data import ImageCaptionDataset, load_prompts, sample_indices

# Distinct solid colours, so that an item's pixels identify which file it came from.
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(autouse=True)
def _strict_pil(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _image(colour, size=(24, 16)):
    return Image.new("RGB", size, COLOURS[colour])


def _colour_of(pixels: torch.Tensor) -> str:
    rgb = tuple(round((v + 1) * 127.5) for v in pixels.mean(dim=(1, 2)).tolist())
    return min(COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(COLOURS[c], rgb)))


def _check_item(item, res=8):
    x = item["pixel_values"]
    assert x.shape == (3, res, res) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(item["prompt"], str)


def _caption_folder(root):
    root.mkdir(exist_ok=True)
    for c in COLOURS:
        _image(c).save(root / f"{c}.png")
        (root / f"{c}.txt").write_text(f"a {c} square\n")
    return root


def _truncated_jpeg(path):
    _image("red", (64, 64)).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- layouts ---------------------------------------------------------------------------------------


def test_caption_files_layout(tmp_path):
    root = _caption_folder(tmp_path / "ds")
    _image("blue").save(root / "nocap.jpg")
    ds = ImageCaptionDataset(root, resolution=8)
    assert len(ds) == 4
    by_prompt = {ds[i]["prompt"]: ds[i] for i in range(len(ds))}
    for c in COLOURS:
        _check_item(by_prompt[f"a {c} square"])
        assert _colour_of(by_prompt[f"a {c} square"]["pixel_values"]) == c
    assert _colour_of(by_prompt[""]["pixel_values"]) == "blue"  # image without caption file
    assert ds.num_skipped == 0


def test_imagefolder_metadata_layout(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for c in COLOURS:
        _image(c).save(tmp_path / "imgs" / f"{c}.jpg")
        rows.append({"file_name": f"imgs/{c}.jpg", "caption": f"{c} thing"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    assert ds.caption_column == "caption" and len(ds) == 3
    for i, c in enumerate(COLOURS):
        item = ds[i]
        _check_item(item)
        assert item["prompt"] == f"{c} thing" and _colour_of(item["pixel_values"]) == c
    with pytest.raises(ValueError, match="caption column"):
        ImageCaptionDataset(tmp_path, resolution=8, caption_column="nope")


def test_metadata_bad_json_names_line(tmp_path):
    _image("red").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2"):
        ImageCaptionDataset(tmp_path, resolution=8)


def test_hf_saved_dataset_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string")})
    ds_hf = datasets.Dataset.from_dict(
        {"img": [_image(c) for c in COLOURS], "prompt": [f"hf {c}" for c in COLOURS]}, features=features
    )
    ds_hf.save_to_disk(str(tmp_path / "hf"))
    ds = ImageCaptionDataset(tmp_path / "hf", resolution=8)  # image column found by its Image feature
    assert (ds.image_column, ds.caption_column) == ("img", "prompt")
    for i, c in enumerate(COLOURS):
        item = ds[i]
        _check_item(item)
        assert item["prompt"] == f"hf {c}" and _colour_of(item["pixel_values"]) == c
    with pytest.raises(ValueError, match="no image column"):
        ImageCaptionDataset(tmp_path / "hf", resolution=8, image_column="image")


# -- preprocessing ---------------------------------------------------------------------------------


def test_resize_center_crop_and_flip(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white, right half black
    img.save(tmp_path / "half.png")
    # 40x20 -> 16x8 -> centre crop 8x8 spans the white/black boundary at column 4.
    x = ImageCaptionDataset(tmp_path, resolution=8)[0]["pixel_values"]
    _check_item({"pixel_values": x, "prompt": ""})
    assert x[:, :, 0].min() > 0.9 and x[:, :, -1].max() < -0.9
    flipped = ImageCaptionDataset(tmp_path, resolution=8, random_flip=True)
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(flipped[0]["pixel_values"])
    assert any(torch.equal(o, x) for o in outs) and any(torch.equal(o, x.flip(-1)) for o in outs)


def test_random_crop_varies_and_upscales_small_images(tmp_path):
    ramp = Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90)  # dark-to-bright left to right
    ramp.resize((64, 16)).convert("RGB").save(tmp_path / "ramp.png")
    ds = ImageCaptionDataset(tmp_path, resolution=16, center_crop=False)
    torch.manual_seed(0)
    crops = {round(ds[0]["pixel_values"].mean().item(), 3) for _ in range(10)}
    assert len(crops) > 1
    Image.new("RGB", (4, 6)).save(tmp_path / "ramp.png")
    _check_item(ImageCaptionDataset(tmp_path, resolution=16)[0], res=16)


# -- corrupt files ---------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _caption_folder(tmp_path / "ds")
    _truncated_jpeg(root / "bad_a.jpg")  # sorted order: bad_a, bad_b, blue, green, red
    (root / "bad_b.png").write_text("not an image")
    ds = ImageCaptionDataset(root, resolution=8)
    assert len(ds) == 5
    with pytest.warns(UserWarning) as record:
        item = ds[0]
    messages = [str(w.message) for w in record]
    assert any("bad_a.jpg" in m for m in messages) and any("bad_b.png" in m for m in messages)
    assert item["prompt"] == "a blue square"  # next good item after index 0, deterministically
    _check_item(item)
    assert ds.num_skipped == 2 and sorted(ds.skipped) == ["bad_a.jpg", "bad_b.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each bad file is warned about only once
        assert ds[1]["prompt"] == "a blue square" and ds[0]["prompt"] == "a blue square"
    assert ds.num_skipped == 2


def test_skip_wraps_around(tmp_path):
    _image("green").save(tmp_path / "a.png")
    (tmp_path / "z.png").write_bytes(b"\x89PNG garbage")
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    with pytest.warns(UserWarning, match="z.png"):
        assert _colour_of(ds[1]["pixel_values"]) == "green"
    assert ds.skipped == ["z.png"]


def test_all_corrupt_folder_raises(tmp_path):
    _truncated_jpeg(tmp_path / "a.jpg")
    (tmp_path / "b.png").write_text("text")
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=str(tmp_path)):
        ds[0]
    assert ds.num_skipped == 2


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageCaptionDataset(tmp_path / "nowhere", resolution=8)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="metadata.jsonl") as e:
        ImageCaptionDataset(tmp_path, resolution=8)
    assert str(tmp_path) in str(e.value)


# -- prompts ---------------------------------------------------------------------------------------


def test_load_prompts_txt(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\na cat\n\n  a dog  \n#skip\nan owl\n")
    assert load_prompts(p) == ["a cat", "a dog", "an owl"]


def test_load_prompts_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [{"prompt": "one", "text": "ignored"}, {"text": "two"}, {"caption": "three"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_prompts(str(p)) == ["one", "two", "three"]


def test_load_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        load_prompts(bad)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"prompt": "ok"}\n{"title": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(nokey)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="No prompts"):
        load_prompts(empty)
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match="Unsupported"):
        load_prompts(tmp_path / "p.csv")


# -- batch order -----------------------------------------------------------------------------------


def test_sample_indices_deterministic_and_seeded():
    a = [sample_indices(10, 3, s, seed=1) for s in range(20)]
    assert a == [sample_indices(10, 3, s, seed=1) for s in reversed(range(20))][::-1]
    assert a != [sample_indices(10, 3, s, seed=2) for s in range(20)]
    assert all(len(b) == 3 and all(0 <= i < 10 for i in b) for b in a)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sample_indices_epochs_and_ranks(world_size):
    n, bs = 24, 3  # divisible by the global batch: every item exactly once per epoch
    spe = n // (bs * world_size)
    epochs = []
    for epoch in range(3):
        seen = []
        for s in range(epoch * spe, (epoch + 1) * spe):
            per_rank = [
                sample_indices(n, bs, s, seed=7, rank=r, world_size=world_size) for r in range(world_size)
            ]
            flat = [i for b in per_rank for i in b]
            assert len(set(flat)) == len(flat)  # ranks disjoint within a step
            seen += flat
        assert sorted(seen) == list(range(n))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_sample_indices_uneven_epoch_pads():
    n, bs, ws = 10, 2, 2  # 3 steps per epoch of 4, the last one padded by 2 wrapped items
    seen = [i for s in range(3) for r in range(ws) for i in sample_indices(n, bs, s, 0, r, ws)]
    assert set(seen) == set(range(n)) and len(seen) == 12
    with pytest.raises(ValueError):
        sample_indices(n, bs, 0, 0, rank=2, world_size=2)


def test_cache_latents_batches_equal_uncached_ones():
    """``cache_latents`` keeps each image's VAE posterior: batches are identical to encoding every step (each image
    is encoded alone, so the same bits in any batch)."""
    from fastdiff.config import TrainConfig
    from fastdiff.data import DigitsDataset
    from fastdiff.demo import DIGITS_TEACHER
    from fastdiff.run import make_batch_fn
    from fastdiff.teacher import Teacher

    teacher, data = Teacher(str(DIGITS_TEACHER)), DigitsDataset()
    fns = {
        c: make_batch_fn(TrainConfig(train_batch_size=8, cache_latents=c), teacher, 32, None, data, 0, 1)
        for c in (False, True)
    }
    calls = []
    encode = teacher.vae.encode
    teacher.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    for step in (0, 1, 0):  # step 0 again: served from the cache
        a, b = (fns[c](step, 0, torch.Generator().manual_seed(step)) for c in (False, True))
        assert a["prompts"] == b["prompts"]
        assert torch.equal(a["real"], b["real"])
    assert calls == [1] * 40  # one image a call; uncached: every step; cached: steps 0 and 1 only


def test_cpu_threads_setting():
    import os

    from fastdiff.run import cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(None, 1) is None  # leave the launcher's choice
    assert cpu_threads(3, 2) == 3
    assert (
        cpu_threads(0, 1) == cores and cpu_threads(0, 10 * cores) == 1
    )  # all cores, shared by the processes
    with pytest.raises(ValueError, match="cpu_threads must be >= 0"):
        cpu_threads(-1, 1)
