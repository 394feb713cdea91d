"""WebDataset tar shards as ``dataset=``: brace patterns, a header-only index, member extensions as columns,
corrupt samples and shards, the same batches on resume, and a tiny training run that resumes exactly."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file

from fastdiff.config import TrainConfig, load_config
from fastdiff.data import StepItemLoader, TarShardDataset, item_seed, open_dataset, sample_indices
from fastdiff.data_tar import expand_braces, find_shards
from fastdiff.run import make_batch_fn

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "assets/configs/tiny_sdxl_dmd2.yaml"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@pytest.fixture(autouse=True)
def _strict_pil(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _image(colour: str, fmt: str = "PNG", size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, fmt)
    return buf.getvalue()


def _colour_of(pixels: torch.Tensor) -> str:
    rgb = tuple(round((v + 1) * 127.5) for v in pixels.mean(dim=(1, 2)).tolist())
    return min(COLOURS, key=lambda c: sum(abs(a - b) for a, b in zip(COLOURS[c], rgb)))


def _write_shard(path: Path, samples: dict[str, dict[str, bytes | str]]) -> dict[str, int]:
    """A tar of ``{key: {ext: data}}``; returns each member's header offset, by member name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def _colour_shards(folder: Path, per_shard: int = 3, shards: int = 2) -> list[str]:
    """``shards`` shards of ``per_shard`` samples, sample ``k`` of shard ``s`` captioned ``"s k colour"``."""
    names = list(COLOURS)
    for s in range(shards):
        samples = {}
        for k in range(per_shard):
            c = names[(s * per_shard + k) % len(names)]
            samples[f"{s:02d}{k:04d}"] = {"png": _image(c), "txt": f"{s} {k} {c}"}
        _write_shard(folder / f"train-{s:03d}.tar", samples)
    return [f"{s} {k} {names[(s * per_shard + k) % 4]}" for s in range(shards) for k in range(per_shard)]


# -- shards and the index --------------------------------------------------------------------------


def test_brace_patterns_expand_in_order(tmp_path):
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="counts down"):
        expand_braces("a-{3..1}.tar")
    _colour_shards(tmp_path)
    assert [p.name for p in find_shards(f"{tmp_path}/train-{{000..001}}.tar")] == [
        "train-000.tar",
        "train-001.tar",
    ]
    with pytest.raises(
        FileNotFoundError, match=r"2 of 4 tar shards of .* not found, first: .*train-002\.tar"
    ):
        find_shards(f"{tmp_path}/train-{{000..003}}.tar")
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.tar\.gz: compressed tar shards cannot be read at random"):
        open_dataset(str(tmp_path / "x.tar.gz"), 8)


def test_two_shards_index_their_headers_only_and_samples_know_their_source(tmp_path, monkeypatch):
    captions = _colour_shards(tmp_path, per_shard=3)
    big = {f"{k}": {"npy": bytes(200_000), "png": _image("blue"), "txt": "big"} for k in range(3)}
    _write_shard(tmp_path / "big/big.tar", big)
    read = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(tarfile, "bltn_open", lambda name, mode: Counting(name, mode))
    ds = open_dataset(str(tmp_path / "big"), 8)  # a folder of shards
    assert len(ds) == 3 and sum(read) < 512 * (
        9 + 3
    )  # a header a member (+ the end), none of the 600 kB data
    monkeypatch.undo()

    ds = open_dataset(f"{tmp_path}/train-{{000..001}}.tar", 8, caption_column="txt")
    assert isinstance(ds, TarShardDataset) and len(ds) == 6
    for i, caption in enumerate(captions):
        item = ds[i]
        assert item["prompt"] == caption and _colour_of(item["pixel_values"]) == caption.split()[-1]
        assert item["pixel_values"].shape == (3, 8, 8)
    assert ds.captions() == captions and ds.num_skipped == 0
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    with pytest.raises(ValueError, match=r"junk\.tar: not a readable uncompressed tar file"):
        open_dataset(str(tmp_path / "junk.tar"), 8)


def test_columns_choose_member_extensions(tmp_path):
    meta = {"caption": "from json caption", "text": "from json text", "label": 3}
    samples = {
        "a": {
            "jpg": _image("red", "JPEG"),
            "png": _image("blue"),
            "txt": "from txt",
            "json": json.dumps(meta),
        },
        "b": {"webp": _image("green", "WEBP"), "json": json.dumps({**meta, "caption": ["one", "two"]})},
        "c": {"cls": "7", "json": json.dumps({"label": 4})},  # no image member
    }
    _write_shard(tmp_path / "s.tar", samples)
    shard = str(tmp_path / "s.tar")

    ds = open_dataset(shard, 8)  # jpg before png; .txt, else text of .json
    assert _colour_of(ds[0]["pixel_values"]) == "red" and ds[0]["prompt"] == "from txt"
    assert _colour_of(ds[1]["pixel_values"]) == "green" and ds[1]["prompt"] == "from json text"
    assert ds.column("label") == [3, 3, 4]
    ds = open_dataset(shard, 8, image_column="png;webp", caption_column="json:caption")
    assert _colour_of(ds[0]["pixel_values"]) == "blue" and ds[0]["prompt"] == "from json caption"
    assert ds[1]["prompt"] in ("one", "two")  # a list of captions: one is picked
    assert open_dataset(shard, 8, caption_column="json")[0]["prompt"] == "from json text"
    assert open_dataset(shard, 8, image_column="cls;jpg", caption_column="cls").captions() == ["", "", "7"]
    with pytest.raises(
        ValueError, match=r"no sample has its image member \(tif\); extensions there are \['cls', "
    ):
        open_dataset(shard, 8, image_column="tif")
    with pytest.raises(ValueError, match=r"no sample has its caption member \(\.md\).*set caption_column="):
        open_dataset(shard, 8, caption_column="md")


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    samples = {
        "0": {"png": _image("red"), "txt": "red"},
        "1": {"png": b"not an image", "txt": "broken"},
        "2": {"png": _image("green")},  # no caption
        "3": {"png": _image("green"), "json": '{"url": "x"}'},  # no caption field
        "4": {"png": _image("blue"), "txt": "blue"},
    }
    _write_shard(tmp_path / "s.tar", samples)
    ds = open_dataset(str(tmp_path / "s.tar"), 8)
    with pytest.warns(UserWarning) as record:
        item = ds[1]
    assert item["prompt"] == "blue" and _colour_of(item["pixel_values"]) == "blue"  # the next readable sample
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and "Skipping unreadable image s.tar/1 in " in messages[0]
    assert "no caption member (.txt, or text/caption/prompt of .json)" in messages[1]
    assert "no caption field text/caption/prompt in its .json member" in messages[2]
    assert ds.skipped == ["s.tar/1", "s.tar/2", "s.tar/3"] and ds.num_skipped == 3
    assert ds[2]["prompt"] == "blue" and ds.num_skipped == 3  # each bad sample is met once


def test_truncated_and_corrupt_shards(tmp_path):
    samples = {str(k): {"png": _image("red"), "txt": f"red {k}"} for k in range(3)}
    offsets = _write_shard(tmp_path / "good.tar", samples)
    data = (tmp_path / "good.tar").read_bytes()

    cut = tmp_path / "cut/cut.tar"  # cut inside the last member's data: that sample is skipped
    cut.parent.mkdir()
    cut.write_bytes(data[: offsets["2.txt"] + 512 + 2])
    with pytest.warns(UserWarning, match=r"cut\.tar is truncated: its last sample will be skipped"):
        ds = open_dataset(str(cut), 8)
    assert len(ds) == 3
    with pytest.warns(UserWarning, match=r"cut\.tar/2 .*truncated tar member: 2 of 5 bytes"):
        assert ds[2]["prompt"] == "red 0"
    assert ds.skipped == ["cut.tar/2"]

    (tmp_path / "half.tar").write_bytes(data[: offsets["2.png"] + 300])  # cut inside a header
    with pytest.raises(
        ValueError, match=rf"half\.tar: corrupt or truncated tar header at byte {offsets['2.png']}"
    ):
        open_dataset(str(tmp_path / "half.tar"), 8)
    at = offsets["1.png"]  # a garbled header between good members
    (tmp_path / "bad.tar").write_bytes(data[:at] + b"x" * 512 + data[at + 512 :])
    with pytest.raises(ValueError, match=rf"bad\.tar: corrupt or truncated tar header at byte {at}"):
        open_dataset(str(tmp_path / "bad.tar"), 8)


# -- batches are a function of the step ------------------------------------------------------------


class _StubTeacher:
    """Enough of a Teacher for make_batch_fn: prompts as conditioning, pixels as latents."""

    def encode(self, texts, resolution):
        return list(texts)

    def encode_images(self, pixels, generator=None):
        return pixels

    def latent_posterior(self, pixels):
        return pixels, torch.zeros_like(pixels)

    def sample_latents(self, mean, std, generator=None):
        return mean


def test_batches_are_a_function_of_the_step_and_resume_exactly(tmp_path):
    _colour_shards(tmp_path, per_shard=4, shards=2)
    pattern = f"{tmp_path}/train-{{000..001}}.tar"

    def batch_fn(workers):  # random crops and flips: every item depends on its seed
        ds = TarShardDataset(pattern, 8, center_crop=False, random_flip=True)
        cfg = TrainConfig(
            train_batch_size=3, gradient_accumulation_steps=2, dataloader_num_workers=workers, seed=7
        )
        return make_batch_fn(cfg, _StubTeacher(), 8, None, ds, 0, 1)

    gen = torch.Generator()
    run = batch_fn(0)
    uninterrupted = {(s, m): run(s, m, gen) for s in range(5) for m in range(2)}
    for (s, m), batch in uninterrupted.items():
        assert batch["indices"] == sample_indices(8, 3, s, 7, m, 2)
    resumed = batch_fn(1)  # a fresh index and reader, decoding in a worker process, starting at step 3
    for s in (3, 4):
        for m in range(2):
            a, b = uninterrupted[s, m], resumed(s, m, gen)
            assert a["indices"] == b["indices"] and a["prompts"] == b["prompts"]
            assert torch.equal(a["real"], b["real"])


def test_step_item_loader_reads_the_same_samples_in_workers(tmp_path):
    _colour_shards(tmp_path, per_shard=3, shards=2)
    ds = TarShardDataset(f"{tmp_path}/train-{{000..001}}.tar", 8)

    def plan(key):
        idx = sample_indices(len(ds), 2, key, 3)
        return idx, [item_seed(3, key, p) for p in range(len(idx))]

    keys = [0, 1, 4, 2]
    in_process = StepItemLoader(ds, plan)
    workers = StepItemLoader(ds, plan, num_workers=1)
    for k in keys:
        (ia, xa), (ib, xb) = in_process(k), workers(k)
        assert ia == ib and [x["prompt"] for x in xa] == [x["prompt"] for x in xb]


# -- a tiny training run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from fastdiff.models.tiny import save_tiny

    return str(save_tiny("sdxl", tmp_path_factory.mktemp("teacher") / "sdxl"))


def test_shards_train_skip_a_corrupt_sample_and_resume_exactly(tiny_sdxl, tmp_path, monkeypatch, caplog):
    from fastdiff.run import train

    monkeypatch.chdir(REPO)
    _colour_shards(tmp_path / "shards", per_shard=3, shards=2)
    _write_shard(tmp_path / "shards/train-002.tar", {"9": {"jpg": b"\xff\xd8 broken", "txt": "broken"}})
    pattern = f"{tmp_path}/shards/train-{{000..002}}.tar"

    def run(out: str, steps: int, *extra: str):
        overrides = [
            f"teacher={tiny_sdxl}",
            f"output_dir={tmp_path / out}",
            f"dataset={pattern}",
            "prompts=null",
        ]
        overrides += [f"max_steps={steps}", "checkpointing_steps=2", "validation_steps=100", "export=false"]
        train(load_config(TINY_RECIPE, overrides + ["dataloader_num_workers=1", *extra]))

    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        run("a", 4)  # 7 samples, 2 a step: every sample is met by step 4
    assert any(
        "1 unreadable images were skipped: ['train-002.tar/9']" in r.getMessage() for r in caplog.records
    )
    state = json.loads((tmp_path / "a/checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert state["step"] == 4 and "critic/gan_d" in state["last_terms"]  # real images reached the loss
    run("b", 2)
    run("b", 4, "resume_from_checkpoint=latest")
    a = load_file(str(tmp_path / "a/checkpoints/checkpoint-4/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/checkpoint-4/trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    moved = load_file(str(tmp_path / "b/checkpoints/checkpoint-2/trainable.safetensors"))
    assert any(not torch.equal(moved[k], a[k]) for k in a)  # the comparison can fail
