"""Data as users keep it: table files (csv / json / jsonl / parquet), chosen columns, and images decoded in
DataLoader workers with the same batches (and the same batches on resume) as in the training process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from fastdiff.config import TrainConfig, describe, load_config
from fastdiff.data import ImageCaptionDataset, StepItemLoader, item_seed, open_dataset, sample_indices
from fastdiff.run import make_batch_fn

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@pytest.fixture(autouse=True)
def _strict_pil(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _colour_of(pixels: torch.Tensor) -> str:
    rgb = tuple(round((v + 1) * 127.5) for v in pixels.mean(dim=(1, 2)).tolist())
    return min(COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(COLOURS[c], rgb)))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _colour_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c, rgb in COLOURS.items():
        paths[c] = folder / f"{c}.png"
        Image.new("RGB", (24, 16), rgb).save(paths[c])
    return paths


# -- table files and columns -----------------------------------------------------------------------


def test_csv_with_custom_columns_relative_and_absolute_paths(tmp_path):
    images = _colour_images(tmp_path / "imgs")
    rows = [{"file": f"imgs/{c}.png", "text": f"a {c} square", "id": i} for i, c in enumerate(COLOURS)]
    rows[1]["file"] = str(images["green"].resolve())  # absolute paths work too
    data = _write_csv(tmp_path / "data.csv", rows)
    ds = ImageCaptionDataset(data, resolution=8, image_column="file", caption_column="text")
    assert len(ds) == 4 and (ds.image_column, ds.caption_column) == ("file", "text")
    for i, c in enumerate(COLOURS):
        item = ds[i]
        assert item["prompt"] == f"a {c} square" and _colour_of(item["pixel_values"]) == c
        assert item["pixel_values"].shape == (3, 8, 8)
    assert ds.captions() == [f"a {c} square" for c in COLOURS]
    assert ds.column("id") == ["0", "1", "2", "3"]  # csv values are strings


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".json-lines"])
def test_json_jsonl_parquet_files_find_their_columns(tmp_path, suffix):
    _colour_images(tmp_path / "imgs")
    rows = [{"image": f"imgs/{c}.png", "caption": f"{c} thing"} for c in COLOURS]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix in (".jsonl", ".json-lines"):  # JSON lines, also under a .json name
        path = path.with_suffix(".jsonl" if suffix == ".jsonl" else ".json")
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        pa = pytest.importorskip("pyarrow")
        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = open_dataset(str(path), 8)
    assert (ds.image_column, ds.caption_column) == ("image", "caption")
    assert [ds[i]["prompt"] for i in range(4)] == [f"{c} thing" for c in COLOURS]
    assert [_colour_of(ds[i]["pixel_values"]) for i in range(4)] == list(COLOURS)


def test_parquet_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = _colour_images(tmp_path / "imgs")
    rows = [{"img": {"bytes": images[c].read_bytes(), "path": f"{c}.png"}, "prompt": c} for c in COLOURS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    ds = ImageCaptionDataset(tmp_path / "data.parquet", resolution=8, image_column="img")
    assert [_colour_of(ds[i]["pixel_values"]) for i in range(4)] == list(COLOURS)
    assert ds.caption_column == "prompt"


def test_metadata_jsonl_with_chosen_columns(tmp_path):
    _colour_images(tmp_path)
    rows = [{"img": f"{c}.png", "desc": f"{c} desc", "text": "ignored"} for c in COLOURS]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = ImageCaptionDataset(tmp_path, resolution=8, image_column="img", caption_column="desc")
    assert ds[2]["prompt"] == "blue desc" and _colour_of(ds[2]["pixel_values"]) == "blue"


def test_missing_columns_name_the_key_and_the_columns(tmp_path):
    _colour_images(tmp_path / "imgs")
    data = _write_csv(tmp_path / "data.csv", [{"file": "imgs/red.png", "text": "red"}])
    with pytest.raises(ValueError, match=r"no caption column 'label'; columns are \['file', 'text'\]") as e:
        ImageCaptionDataset(data, resolution=8, caption_column="label")
    assert "set caption_column=" in str(e.value) and "data.csv" in str(e.value)
    with pytest.raises(
        ValueError, match=r"no image column one of .*columns are \['picture', 'text'\]; set image_column"
    ):
        ImageCaptionDataset(
            _write_csv(tmp_path / "pics.csv", [{"picture": "imgs/red.png", "text": "red"}]), 8
        )
    with pytest.raises(ValueError, match="image_column"):
        ImageCaptionDataset(data, resolution=8, image_column="path")
    (tmp_path / "caps").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "caps/a.png")
    with pytest.raises(ValueError, match=r"\.txt captions"):
        ImageCaptionDataset(tmp_path / "caps", resolution=8, caption_column="text")
    with pytest.raises(ValueError, match="no columns to choose"):
        open_dataset("builtin:digits", 8, caption_column="text")


def test_missing_paths_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        ImageCaptionDataset(tmp_path / "nowhere.csv", resolution=8)
    (tmp_path / "data.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"data\.txt is neither a folder nor a \.csv"):
        ImageCaptionDataset(tmp_path / "data.txt", resolution=8)
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        ImageCaptionDataset(tmp_path / "bad.jsonl", resolution=8)


def test_missing_and_corrupt_images_are_skipped_naming_row_and_file(tmp_path):
    _colour_images(tmp_path / "imgs")
    (tmp_path / "imgs/broken.png").write_bytes(b"not an image")
    rows = [
        {"file": "imgs/red.png", "text": "red"},
        {"file": "imgs/gone.png", "text": "gone"},
        {"file": "imgs/broken.png", "text": "broken"},
        {"file": "imgs/blue.png", "text": "blue"},
    ]
    data = _write_csv(tmp_path / "data.csv", rows)
    ds = ImageCaptionDataset(data, resolution=8, image_column="file", caption_column="text")
    with pytest.warns(UserWarning) as record:
        assert ds[1]["prompt"] == "blue"  # the next readable row
    messages = [str(w.message) for w in record]
    assert any("imgs/gone.png (data.csv, line 3)" in m for m in messages)
    assert any("imgs/broken.png (data.csv, line 4)" in m for m in messages)
    assert ds.skipped == ["imgs/gone.png", "imgs/broken.png"]


def test_config_keys_and_print_config(capsys):
    cfg = load_config(
        TINY_RECIPE,
        ["image_column=file", "caption_column=text", "dataloader_num_workers=2"],
        require_teacher=False,
    )
    assert (cfg.image_column, cfg.caption_column, cfg.dataloader_num_workers) == ("file", "text", 2)
    lines = describe(cfg).splitlines()
    assert any(
        line.startswith("caption_column: text  # default null; dataset's caption column") for line in lines
    )
    assert any(
        line.startswith("image_column: file  # default null; dataset's image column") for line in lines
    )
    assert any(
        line.startswith("dataloader_num_workers: 2  # default 0; processes decoding") for line in lines
    )


# -- decoding in workers ---------------------------------------------------------------------------


def _random_crop_dataset(tmp_path) -> ImageCaptionDataset:
    """Ramps with random crops, flips and caption choices: every item depends on torch's RNG."""
    rows = []
    for i in range(7):
        ramp = Image.linear_gradient("L").resize((48, 16)).convert("RGB")
        ramp.save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"{i} a", f"{i} b", f"{i} c"]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return ImageCaptionDataset(tmp_path, resolution=8, center_crop=False, random_flip=True)


def _plan(num_items: int, batch_size: int = 3, seed: int = 5):
    def plan(key):
        idx = sample_indices(num_items, batch_size, key, seed)
        return idx, [item_seed(seed, key, p) for p in range(len(idx))]

    return plan


def _same(a, b):
    (ia, xa), (ib, xb) = a, b
    assert ia == ib and [x["prompt"] for x in xa] == [x["prompt"] for x in xb]
    for x, y in zip(xa, xb):
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_workers_give_the_same_items_in_the_same_order_and_on_resume(tmp_path):
    ds = _random_crop_dataset(tmp_path)
    plan = _plan(len(ds))
    in_process = StepItemLoader(ds, plan, num_workers=0)
    keys = [0, 0, 1, 2, 4, 5, 3, 9]  # repeat, step over one, jump back, jump ahead
    expected = {k: in_process(k) for k in keys}
    assert len({tuple(it["prompt"] for it in expected[k][1]) for k in keys}) > 1
    rng = torch.get_rng_state()
    workers = StepItemLoader(ds, plan, num_workers=2)
    for k in keys:
        _same(workers(k), expected[k])
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the caller's RNG alone
    resumed = StepItemLoader(ds, plan, num_workers=2)  # a resumed run asks for its first step first
    for k in (5, 6):
        _same(resumed(k), in_process(k))


def test_unreadable_images_found_by_workers_are_recorded_in_the_main_process(tmp_path):
    _colour_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    names = ["red.png", "broken.png", "blue.png"]
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": n, "text": n}) for n in names)
    )
    ds = ImageCaptionDataset(tmp_path, resolution=8)
    loader = StepItemLoader(ds, lambda key: ([0, 1, 2], [0, 0, 0]), num_workers=1)
    _, items = loader(0)
    assert [it["prompt"] for it in items] == ["red.png", "blue.png", "blue.png"]
    assert ds.skipped == ["broken.png"]


class _StubTeacher:
    """Enough of a Teacher for make_batch_fn: prompts as conditioning, pixels as latents."""

    def encode(self, texts, resolution):
        return list(texts)

    def latent_posterior(self, pixels):
        return pixels, torch.zeros_like(pixels)

    def sample_latents(self, mean, std, generator=None):
        return mean


def test_batch_fn_with_workers_and_resumed_equals_in_process(tmp_path):
    ds = _random_crop_dataset(tmp_path)

    def batch_fn(workers):
        cfg = TrainConfig(train_batch_size=2, gradient_accumulation_steps=2, dataloader_num_workers=workers)
        return make_batch_fn(cfg, _StubTeacher(), 8, None, ds, 0, 1)

    gen = torch.Generator()
    in_process, with_workers = batch_fn(0), batch_fn(2)
    for step in range(4):
        for micro in range(2):
            a, b = in_process(step, micro, gen), with_workers(step, micro, gen)
            assert a["indices"] == b["indices"] and a["prompts"] == b["prompts"]
            assert torch.equal(a["real"], b["real"])
    resumed = batch_fn(2)
    for micro in range(2):
        a, b = in_process(3, micro, gen), resumed(3, micro, gen)
        assert a["prompts"] == b["prompts"] and torch.equal(a["real"], b["real"])


# -- a tiny training run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from fastdiff.models.tiny import save_tiny

    return str(save_tiny("sdxl", tmp_path_factory.mktemp("teacher") / "sdxl"))


def test_a_csv_with_custom_columns_trains(tiny_sdxl, tmp_path, monkeypatch):
    from fastdiff.run import train

    monkeypatch.chdir(REPO)
    _colour_images(tmp_path / "imgs")
    rows = [{"file": f"imgs/{c}.png", "text": f"a {c} square"} for c in COLOURS]
    data = _write_csv(tmp_path / "data.csv", rows)
    out = tmp_path / "out"
    cfg = load_config(
        TINY_RECIPE,
        [
            f"teacher={tiny_sdxl}",
            f"output_dir={out}",
            f"dataset={data}",
            "caption_column=text",
            "image_column=file",
            "dataloader_num_workers=1",
            "prompts=null",
            "max_steps=2",
            "checkpointing_steps=2",
            "validation_steps=100",
            "export=false",
        ],
    )
    train(cfg)
    state = json.loads((out / "checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["step"] == 2 and state["config"]["caption_column"] == "text"
    assert "critic/gan_d" in state["last_terms"]  # real images reached the loss
