"""bench scale: the same code as the full-size GPU bench, on tiny UNets on the CPU."""

import json

import pytest
import torch

from fastdiff.eval import bench_scale


def test_tiny_rows_and_files(tmp_path):
    rows = bench_scale.run(tmp_path, tiny=True, iters=1, warmup=0, batches=(1, 2), families=("sdxl",))
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["rows"] == rows and saved["tiny"] is True and saved["device"] == "cpu"
    assert saved["torch"] == torch.__version__
    assert all(set(r) == set(bench_scale.FIELDS) for r in rows)
    by = {(r["mode"], r["optimizer"], r["batch"]): r for r in rows}
    assert (
        len(by) == len(rows) == 10
    )  # 2 batches x (shared-base, full-copy x 2 optimizers, fsdp x 2 optimizers)
    for mode in ("shared-base", "full-copy"):
        for batch in (1, 2):
            r = by[(mode, "adamw", batch)]
            assert r["error"] is None and r["skipped"] is None, r
            assert r["fit"] is True and r["s_per_it"] > 0 and r["images_per_s"] > 0
            assert r["images_per_s"] == pytest.approx(batch / r["s_per_it"])
            assert r["peak_gib"] is None and r["unet_params"] > 0 and r["resolution"] == 64
    for optimizer in ("adamw", "adamw8bit"):
        fsdp = by[("fsdp", optimizer, 1)]
        assert fsdp["fit"] is None and "2 processes" in fsdp["skipped"]
    eight_bit = by[("full-copy", "adamw8bit", 1)]
    assert eight_bit["fit"] is None and "CUDA" in eight_bit["skipped"]
    shared, full = by[("shared-base", "adamw", 1)], by[("full-copy", "adamw", 1)]
    assert shared["trainable_params"] < full["trainable_params"]
    assert full["trainable_params"] == 2 * full["unet_params"]  # generator and fake score: two full copies
    assert shared["frozen_params"] == shared["unet_params"]  # the one shared base
    table = (tmp_path / "scale.md").read_text()
    assert "dfake_gen_update_ratio=1" in table and "| shared-base |" in table and "images_per_s" in table


def test_full_size_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--tiny"):
        bench_scale.run(tmp_path)
    with pytest.raises(ValueError, match="unknown mode"):
        bench_scale.run(tmp_path, tiny=True, modes=("ddp",))
