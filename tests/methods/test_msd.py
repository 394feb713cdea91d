"""MSD: the partition (balanced k-means, class blocks, a user's table) and its errors, the students' turns (two-time-
scale rule per student), each turn's batch drawn from its student's partition, routing, and the analytic GMM with K
students trained through the real Trainer."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fastdiff.methods.msd import MSD, MSDConfig, Partition, balanced_kmeans, check_config, make_partition
from fastdiff.methods.msd.method import _critic_due, _generator_due


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _embed_by_digit(prompts):
    """Prompts "p<d>-<i>": embedding near axis d (so k-means has an obvious answer)."""
    out = []
    for p in prompts:
        d, i = (int(v) for v in p[1:].split("-"))
        v = torch.full((6,), 0.05 * (i % 3))
        v[d] = 1.0
        out.append(v)
    return _unit(torch.stack(out))


# --- partition ------------------------------------------------------------------------------------------------
def test_balanced_kmeans_gives_equal_sizes_even_for_skewed_clusters():
    g = torch.Generator().manual_seed(0)
    big = _unit(torch.tensor([1.0, 0.0]) + 0.05 * torch.randn(30, 2, generator=g))
    small = _unit(torch.tensor([0.0, 1.0]) + 0.05 * torch.randn(10, 2, generator=g))
    assign, centroids = balanced_kmeans(torch.cat([big, small]), 2, 50, torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(assign).tolist()) == [20, 20]  # plain k-means would give 30 / 10
    assert torch.allclose(centroids.norm(dim=1), torch.ones(2))
    odd, _ = balanced_kmeans(torch.cat([big, small])[:39], 4, 50, torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(odd).tolist()) == [9, 10, 10, 10]


def test_kmeans_partition_keeps_a_prompt_on_one_student_and_routes_by_table_and_centroid():
    prompts = [f"p{d}-{i}" for d in range(3) for i in range(4)]
    items = prompts + prompts[:5]  # repeated prompts (e.g. several images per caption)
    part = make_partition(items, 3, "kmeans", _embed_by_digit)
    assert part.sizes() == [4, 4, 4]
    assert all(int(part.item_student[i]) == part.table[p] for i, p in enumerate(items))
    by_digit = {d: {part.table[f"p{d}-{i}"] for i in range(4)} for d in range(3)}
    assert all(len(s) == 1 for s in by_digit.values()) and len(set.union(*by_digit.values())) == 3
    new = _embed_by_digit(["p1-9", "p2-7"])  # unseen prompts: the nearest centroid
    assert part.route_embeddings(new).tolist() == [part.table["p1-0"], part.table["p2-0"]]
    saved = Partition.from_tensors(part.to_tensors())  # what a checkpoint holds
    assert saved.table == part.table and torch.equal(saved.item_student, part.item_student)


def test_classes_partition_cuts_sorted_labels_into_consecutive_blocks():
    items = [f"p{d % 6}-{d}" for d in range(10)]
    labels = list(range(10))
    part = make_partition(items, 2, "classes", _embed_by_digit, labels=labels)
    assert part.item_student.tolist() == [0] * 5 + [1] * 5
    part4 = make_partition(items, 4, "classes", _embed_by_digit, labels=labels)
    assert part4.item_student.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_file_partition(tmp_path):
    items = ["p0-0", "p1-0", "p2-0"]
    f = tmp_path / "table.json"
    f.write_text(json.dumps({"p0-0": 1, "p1-0": 0, "p2-0": 1, "unused": 0}))
    part = make_partition(items, 2, "file", _embed_by_digit, table_file=str(f))
    assert part.item_student.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "kind, extra, match",
    [
        ("kmeans", {"num_students": 5}, "larger than the number of distinct training prompts"),
        ("classes", {"labels": [0, 0, 1]}, "larger than the number of classes"),
        ("file", {"table": {"p0-0": 0, "p1-0": 7, "p2-0": 1}}, "names student 7, unknown"),
        ("file", {"table": {"p0-0": 0, "p1-0": 0}}, "names no student for 1 training prompt"),
        ("file", {"table": {"p0-0": 0, "p1-0": 0, "p2-0": 0}}, "empty partition"),
        (
            "classes",
            {"labels": [0, 1, 2, 2], "items": ["p0-0", "p0-0", "p2-0", "p1-0"]},
            "has labels of students",
        ),
        ("spectral", {}, "msd.partition must be one of"),
    ],
)
def test_bad_partitions_fail_with_a_clear_error(tmp_path, kind, extra, match):
    items = extra.get("items", ["p0-0", "p1-0", "p2-0"])
    table = None
    if "table" in extra:
        table = tmp_path / "t.json"
        table.write_text(json.dumps(extra["table"]))
    k = extra.get("num_students", 2 if kind == "file" else 3)
    with pytest.raises(ValueError, match=match):
        make_partition(
            items, k, kind, _embed_by_digit, labels=extra.get("labels"), table_file=table and str(table)
        )


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"schedule": "random"}, "msd.schedule must be one of"),
        ({"student_width": 0.5}, "set msd.tsm_steps"),
        ({"tsm_steps": 10}, "smaller students only"),
        ({"student_width": 0.5, "tsm_steps": 10}, "msd.dmd2.generator=full"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        check_config(MSDConfig(**changes))


def test_full_networks_cannot_share_the_teachers_unet_with_several_students():
    cfg = MSDConfig()
    cfg.dmd2.fake_score = "full"
    with pytest.raises(ValueError, match="carry earlier students' adapters"):
        check_config(cfg)
    cfg.num_students = 1
    check_config(cfg)  # one student: DMD2's own reference layout


# --- turns and batches ------------------------------------------------------------------------------------------
def test_round_robin_turns_keep_each_students_two_time_scale_rule():
    K, ratio, T = 3, 2, 4
    due = {
        s: [k for k in range(K) if _critic_due(k, K, T, False, s)]
        + [f"g{k}" for k in range(K) if _generator_due(k, K, T, ratio, False, s)]
        for s in range(T + 12)
    }
    assert all(due[s] == [f"g{s % K}"] for s in range(T))  # teacher score matching: generators alone, in turn
    for k in range(K):
        critic_steps = [s for s in due if k in due[s]]
        gen_steps = [s for s in due if s >= T and f"g{k}" in due[s]]
        assert critic_steps == [T + k + K * i for i in range(4)]
        assert gen_steps == critic_steps[::ratio]  # every ratio-th of its own critic updates
    every = {s: _generator_due(0, K, 0, ratio, True, s) for s in range(6)}
    assert every == {0: True, 1: False, 2: True, 3: False, 4: True, 5: False}


def _method(K, schedule, items_student, batch=4):
    cfg = MSDConfig(num_students=K, schedule=schedule)
    part = Partition(torch.tensor(items_student), {}, _unit(torch.randn(K, 3)))
    method = MSD([torch.nn.Linear(1, 1) for _ in range(K)], cfg, part)
    run = SimpleNamespace(train_batch_size=batch, gradient_accumulation_steps=1, seed=0)
    ctx = SimpleNamespace(run=run, rank=0, world_size=1)
    return method, method.batch_indices(ctx)


def test_each_turn_draws_from_its_students_partition():
    items_student = [0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2, 2]
    method, indices = _method(3, "round_robin", items_student)
    for step in range(9):
        idx = indices(step, 0)
        assert len(idx) == 4 and {items_student[i] for i in idx} == {step % 3}
        rows = method.batch_students({"indices": idx})
        assert rows.tolist() == [step % 3] * 4
    method, indices = _method(2, "all", [0, 1, 1, 0, 1, 1], batch=4)
    assert [items_student for items_student in method.batch_students({"indices": indices(0, 0)}).tolist()] == [
        0, 0, 1, 1
    ]  # fmt: skip
    with pytest.raises(ValueError, match="multiple of msd.num_students"):
        _method(3, "all", items_student, batch=4)


# --- the analytic GMM ------------------------------------------------------------------------------------------
def test_gmm_students_each_learn_their_classes(tmp_path):
    """Two students on the 8-class analytic GMM, through the real Trainer: routing sends each class to its student,
    and a short run lowers the NLL of the routed samples (the loss moves every student toward its classes)."""
    from fastdiff.eval import msd_gmm

    before = msd_gmm.train_and_evaluate(2, seed=0, max_steps=1, per_class=300)
    after = msd_gmm.train_and_evaluate(2, seed=0, max_steps=400, per_class=300)
    assert after["nll"] < before["nll"] - 0.1, (before["nll"], after["nll"])


# --- tiny SDXL end to end ----------------------------------------------------------------------------------------
DIFFUSERS_ONLY = """
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
out, dest, *prompts = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(out + "/pipeline", trust_remote_code=True)
ids = pipe.route(prompts)
lat = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
           output_type="latent").images
# diffusers' defaults are the call the students were trained for; other step counts are refused before sampling
assert torch.equal(pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent").images, lat)
try:
    pipe(prompts, num_inference_steps=4, output_type="latent")
    raise SystemExit("4 steps ran")
except ValueError as e:
    assert "trained for [1] step(s)" in str(e) and "fastdiff.json" in str(e), e
# the folder's own code ran (diffusers' import check may import the top-level fastdiff package, nothing under it)
assert type(pipe).__module__.startswith("diffusers_modules") and type(pipe.students).__module__.startswith("diffusers_")
assert not any(m.startswith("fastdiff.") for m in sys.modules), "fastdiff code ran"
save_file({"latents": lat.contiguous(), "ids": torch.tensor(ids)}, dest)
"""


def test_tiny_sdxl_two_shared_base_students_launch_resume_export_and_route(
    tiny_teachers, tmp_path, monkeypatch
):
    """K = 2 LoRA students on one tiny SDXL UNet via `accelerate launch`: a resumed run equals the uninterrupted
    one, the export loads in plain diffusers (trust_remote_code) and sends each prompt of a mixed batch to its
    student, in order, and `fastdiff generate` samples it."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from fastdiff.cli import main
    from fastdiff.config import load_config
    from fastdiff.run import load_checkpoint_method, train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_e2e_tiny import REPO, launch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "\n".join(["a red square", "a red circle", "a blue sky", "a blue sea", "a green tree"])
    )
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = [
        f"teacher={tiny_teachers['sdxl']}", f"prompts={prompts}", "msd.num_students=2", "mixed_precision=no",
        "gradient_checkpointing=false", "msd.dmd2.optim.warmup_steps=0", "msd.dmd2.dfake_gen_update_ratio=2",
        "msd.dmd2.generator_lr=1e-3", "checkpointing_steps=4", "validation_steps=100",
    ]  # fmt: skip
    config = ["--config", str(REPO / "assets/configs/sdxl_msd_1step.yaml")]
    launch(config + args + [f"output_dir={out}", "max_steps=4", "export=false"])
    launch(config + args + [f"output_dir={out}", "max_steps=8", "resume_from_checkpoint=latest"])
    monkeypatch.chdir(REPO)
    train(
        load_config(
            REPO / "assets/configs/sdxl_msd_1step.yaml",
            args + [f"output_dir={ref}", "max_steps=8", "export=false"],
        )
    )
    resumed = load_file(str(out / "checkpoints/checkpoint-8/trainable.safetensors"))
    uninterrupted = load_file(str(ref / "checkpoints/checkpoint-8/trainable.safetensors"))
    assert {k.split("/")[0] for k in resumed} == {
        f"student_{k}.{g}" for k in (0, 1) for g in ("generator", "critic")
    }
    assert resumed.keys() == uninterrupted.keys() and all(
        torch.equal(resumed[k], uninterrupted[k]) for k in resumed
    )

    recipe = json.loads((out / "fastdiff.json").read_text())
    assert recipe["method"] == "msd" and recipe["students"]["lora"] == ["lora/student_0", "lora/student_1"]
    for k in (0, 1):
        names = {f.name for f in (out / f"lora/student_{k}").iterdir()}
        assert {"pytorch_lora_weights.safetensors", "kohya_lora.safetensors"} <= names
    method, teacher, _ = load_checkpoint_method(out / "checkpoints/checkpoint-8")
    table = method.partition.table
    mixed = ["a blue sea", "a red square", "a green tree", "a red circle"]
    assert len({table[p] for p in mixed}) == 2  # both students in one batch
    dest = tmp_path / "theirs.safetensors"
    subprocess.run(
        [sys.executable, "-c", DIFFUSERS_ONLY, str(out), str(dest), *mixed],
        check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    theirs = load_file(str(dest))
    assert theirs["ids"].tolist() == [table[p] for p in mixed]  # the router keeps the training partition
    noise = torch.randn((len(mixed), *teacher.latent_shape()), generator=torch.Generator().manual_seed(0))
    cond = teacher.encode(mixed)
    moved = 0.0
    for i, p in enumerate(mixed):
        student = method.students[table[p]]
        ours = student.generate(noise[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(theirs["latents"][i : i + 1], ours, atol=1e-4, rtol=0)
        other = method.students[1 - table[p]].generate(noise[i : i + 1], cond[i : i + 1])
        moved = max(moved, float((ours - other).abs().max()))
    assert moved > 1e-4  # the students differ, so the routing is tested
    main(["generate", str(out), "a blue sea", "--out", str(tmp_path / "img.png")])
    assert (tmp_path / "img.png").is_file()
