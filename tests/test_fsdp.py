"""parallel=fsdp on two CPU ranks (gloo, the same ``fully_shard`` code a GPU runs): full-copy DMD2 on a tiny SDXL.

One set of runs, compared four ways: two ranks against one rank with two accumulation steps (the same global
batch, so the same losses and weights), a two-rank run killed at step 4 and resumed, the step-4 checkpoint resumed
on one rank, and the exports."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launching import launch_command, launch_env
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# fp32 on both sides; the two-rank run averages gradients with a reduce-scatter where one rank sums two micro-batches:
# the same numbers up to float32 rounding, which Adam's normalisation carries into the weights (measured: 2.8e-6
# after 8 steps; a resume on one rank 1.2e-7; a two-rank resume is exact)
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 2e-5


def run(out: Path, procs: int, *extra: str) -> None:
    cmd = [
        *launch_command(procs), str(REPO / "train/distill.py"),
        "--config", str(REPO / "assets/configs/tiny_sdxl_dmd2.yaml"), f"output_dir={out}", "parallel=fsdp",
        "dmd2.generator=full", "dmd2.fake_score=full", "dmd2.shared_base=false", "dmd2.dfake_gen_update_ratio=2",
        "train_batch_size=2", "checkpointing_steps=1", "checkpoints_total_limit=null", "validation_steps=100",
        "mixed_precision=no", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def state(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoints/checkpoint-{step}/trainer_state.json").read_text())


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / f"checkpoints/checkpoint-{step}/trainable.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def runs(tiny_teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    teacher = f"teacher={tiny_teachers['sdxl']}"
    run(root / "two", 2, teacher, f"max_steps={STEPS}")
    run(root / "one", 1, teacher, f"max_steps={STEPS}", "gradient_accumulation_steps=2")
    run(
        root / "killed", 2, teacher, "max_steps=4", "export=false"
    )  # stopped at step 4: a kill after its save
    run(root / "killed", 2, teacher, f"max_steps={STEPS}", "resume_from_checkpoint=latest", "export=false")
    run(root / "moved", 1, teacher, f"max_steps={STEPS}", "gradient_accumulation_steps=2", "export=false",
        f"resume_from_checkpoint={root / 'two' / 'checkpoints' / 'checkpoint-4'}")  # fmt: skip
    return root


def test_each_rank_holds_about_half_of_the_trainable_bytes(runs):
    held = state(runs / "two", STEPS)["trainable_bytes_by_rank"]
    whole = sum(t.numel() * 4 for t in weights(runs / "two", STEPS).values())  # float32 master weights
    assert len(held) == 2 and all(0.45 * whole < h < 0.6 * whole for h in held), (held, whole)
    assert state(runs / "one", STEPS)["trainable_bytes_by_rank"] == [whole]


def test_two_ranks_train_as_one_rank_with_the_same_global_batch(runs):
    for step in range(1, STEPS + 1):
        two, one = state(runs / "two", step), state(runs / "one", step)
        mean = sum(two["loss_by_rank"]) / 2  # each rank's loss on its half of the global batch
        assert mean == pytest.approx(one["loss_by_rank"][0], rel=LOSS_RTOL), step
    assert_same_weights(weights(runs / "two", STEPS), weights(runs / "one", STEPS))
    assert (runs / "two" / "checkpoints" / f"checkpoint-{STEPS}" / "optimizer" / ".metadata").is_file()


def test_kill_and_resume_gives_the_uninterrupted_weights(runs):
    resumed, uninterrupted = weights(runs / "killed", STEPS), weights(runs / "two", STEPS)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    moved = weights(runs / "killed", STEPS)
    early = weights(runs / "two", 4)
    assert max(float((moved[k] - early[k]).abs().max()) for k in moved) > 10 * WEIGHT_ATOL  # the runs trained


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs):
    assert state(runs / "two", 4)["num_processes"] == 2
    assert_same_weights(weights(runs / "moved", STEPS), weights(runs / "two", STEPS))


def test_the_two_rank_export_equals_the_one_rank_export(runs):
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(runs / "two" / "pipeline", subfolder="unet")
    b = UNet2DConditionModel.from_pretrained(runs / "one" / "pipeline", subfolder="unet")
    worst = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert worst < WEIGHT_ATOL
    recipe = json.loads((runs / "two" / "fastdiff.json").read_text())
    assert recipe["check"]["max_abs_diff_latents"] < 1e-3 and recipe["config"]["parallel"] == "fsdp"


def test_lora_only_runs_are_refused_with_a_clear_error(tiny_teachers, tmp_path):
    from fastdiff.config import load_config
    from fastdiff.methods import build
    from fastdiff.parallel import shard
    from fastdiff.run import run_context
    from fastdiff.teacher import Teacher

    cfg = load_config(REPO / "assets/configs/tiny_sdxl_dmd2.yaml", [f"teacher={tiny_teachers['sdxl']}"])
    method = build(run_context(cfg, Teacher(tiny_teachers["sdxl"]), with_data=False))
    with pytest.raises(ValueError, match="parallel=ddp"):
        shard(method, method.groups(), torch.device("cpu"), None, True)
