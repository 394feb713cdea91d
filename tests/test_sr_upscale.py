"""``fastdiff upscale`` and ``fastdiff bench sr`` on a tiny TAD-SR export: any size in gives exactly 4x out (padding,
tiles), grey/RGBA/16-bit inputs are converted, a non-image, a corrupt file or an oversized image is a clear error;
the bench writes every row and metric."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.sr.upscale import UpscaleError, load_image, load_upscaler, to_rgb, upscale_image

REPO_RECIPE = "assets/configs/sr_tadsr.yaml"


@pytest.fixture(scope="module")
def export(tiny_teachers, tmp_path_factory):
    from pathlib import Path

    from fastdiff.config import load_config
    from fastdiff.run import train

    out = tmp_path_factory.mktemp("tadsr") / "out"
    repo = Path(__file__).resolve().parents[1]
    overrides = [f"teacher={tiny_teachers['sd-x4']}", f"output_dir={out}", "max_steps=1", "train_batch_size=2",
                 "tadsr.target_items=2", "tadsr.target_steps=2", "validation_steps=10", "checkpointing_steps=10"]  # fmt: skip
    train(load_config(repo / REPO_RECIPE, overrides))
    return out


def _save(tmp_path, name, array):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


def test_odd_sizes_grey_and_rgba_come_out_4x_rgb(export, tmp_path):
    rng = np.random.default_rng(0)
    rgba = _save(tmp_path, "a.png", (rng.random((13, 22, 4)) * 255).astype(np.uint8))
    grey = _save(tmp_path, "g.png", (rng.random((9, 7)) * 255).astype(np.uint8))
    for src in (rgba, grey):
        out = tmp_path / f"{src.stem}-x4.png"
        main(["upscale", str(export), str(src), "--out", str(out)])
        w, h = Image.open(src).size
        result = Image.open(out)
        assert result.size == (4 * w, 4 * h) and result.mode == "RGB"


class NearestPipe:
    """A stand-in upscaler (nearest 4x, exactly local) to check the tiling arithmetic."""

    class unet:  # noqa: N801
        class config:  # noqa: N801
            block_out_channels = (8, 16, 16)

    class image_processor:  # noqa: N801
        class config:  # noqa: N801
            vae_scale_factor = 4

    def __call__(self, prompt, image, generator=None, output_type="pt", **kw):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0  # padded to what the pipeline keeps

        class Out:
            images = torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")

        return Out


def test_tiles_blend_to_the_untiled_result():
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.random((41, 53, 3)) * 255).astype(np.uint8))
    whole = np.asarray(upscale_image(NearestPipe(), image, {}, tile=64), dtype=float)
    tiled = np.asarray(upscale_image(NearestPipe(), image, {}, tile=24, overlap=4), dtype=float)
    assert whole.shape == tiled.shape == (164, 212, 3)
    assert np.abs(whole - tiled).max() <= 1  # rounding of the blend only
    expected = np.asarray(image.resize((212, 164), Image.NEAREST), dtype=float)
    assert np.abs(whole - expected).max() == 0


def test_a_tiled_export_run_is_4x(export):
    pipe, call = load_upscaler(export)
    image = Image.fromarray((np.random.default_rng(2).random((30, 37, 3)) * 255).astype(np.uint8))
    assert upscale_image(pipe, image, call, tile=16, overlap=4).size == (148, 120)


def test_bad_inputs_are_clear_errors(export, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UpscaleError, match="not an image"):
        load_image(text)
    good = _save(tmp_path, "ok.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    corrupt = tmp_path / "cut.png"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UpscaleError, match="corrupt|truncated"):
        load_image(corrupt)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    pipe, call = load_upscaler(export)
    with pytest.raises(UpscaleError, match="limit"):
        upscale_image(pipe, Image.new("RGB", (100, 100)), call, max_pixels=50 * 50)
    with pytest.raises(SystemExit) as info:  # the CLI says what is wrong, exit code 2, no traceback
        main(["upscale", str(export), str(text), "--out", str(tmp_path / "o.png")])
    assert info.value.code == 2 and "not an image" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an upscaler export is not a text-to-image generator
        main(["generate", str(export), "a cat", "--out", str(tmp_path / "g.png")])
    assert "fastdiff upscale" in capsys.readouterr().err


def test_modes_convert_to_rgb():
    assert to_rgb(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)  # over white
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("P", (4, 4))).mode == "RGB"


def test_bench_sr_rows_and_files(export, tmp_path):
    from fastdiff.eval.bench_sr import run

    rows = run(export, tmp_path / "bench", teacher_steps=[1, 2], max_patches=6, latency_reps=1)
    assert [r["system"] for r in rows] == ["bicubic", "teacher-1", "teacher-2", "tadsr-1"]
    keys = {
        "psnr_y_image",
        "psnr_y_mean",
        "psnr_y_pooled",
        "ssim_y_mean",
        "lr_psnr_y",
        "seconds_per_patch",
        "seconds_per_patch_denoise",
    }
    assert all(keys <= set(r) for r in rows)
    assert rows[0]["lr_psnr_y"] > 30  # bicubic of an antialiased downscale is nearly LR-consistent
    data = json.loads((tmp_path / "bench/bench.json").read_text())
    assert data["noise_level"] == 20 and len(data["rows"]) == 4
    assert (tmp_path / "bench/bench.md").is_file()
    grid = Image.open(tmp_path / "bench/grid.png")
    assert grid.size[0] == 5 * 32  # LR, bicubic, teacher, student, HR
    assert torch.is_tensor(torch.as_tensor(np.asarray(grid)))
